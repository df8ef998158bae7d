//! TensorBoard event files (`train.tensorboard`): rank 0 writes each step's scalars to
//! `RUN/tensorboard/events.out.tfevents.<time>.<host>.<pid>`, as torch's `SummaryWriter`
//! (torchtitan's `enable_tensorboard`, HF Trainer's `report_to="tensorboard"`) does, so
//! `tensorboard --logdir runs/` draws the curves of every run side by side, live.
//!
//! The format is TensorFlow's `Event` protobuf in TFRecord framing (length, masked CRC-32C of
//! the length, payload, masked CRC-32C of the payload). No well-kept crate writes it (the one
//! on crates.io is unmaintained and pins old `image`/`protobuf`), so the few messages needed
//! are declared here with `prost`, field numbers as in TensorBoard's `event.proto` and
//! `summary.proto`; the tests read the files back with TensorBoard's own reader.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::TrainError;
use crate::metrics::StepRecord;

/// `tensorflow.Event`: the fields motley writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with its `simple_value` (a scalar).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, tag = "2")]
    simple_value: f32,
}

/// `tensorflow.SessionLog`; status 1 is `START`.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SESSION_START: i32 = 1;

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One run's event file, appended to and flushed record by record.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir`. `resumed_at`: the step a resumed run continues after —
    /// TensorBoard then drops what earlier files logged past it (a `SessionLog` START, as
    /// `SummaryWriter(purge_step=…)` writes), so the curves tell the same story as
    /// `metrics.jsonl`.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir).map_err(TrainError::io("create", dir))?;
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let pid = std::process::id();
        // A second writer in the same second and process gets a suffix, as SummaryWriter's does.
        let mut n = 0;
        let (path, file) = loop {
            let name = format!("events.out.tfevents.{secs}.{host}.{pid}.{n}");
            let path = dir.join(name);
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(TrainError::io("create", &path)(e)),
            }
        };
        let mut w = EventWriter { path, file };
        w.write(0, What::FileVersion("brain.Event:2".into()))?;
        if let Some(step) = resumed_at {
            w.write(step + 1, What::SessionLog(SessionLog { status: SESSION_START }))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: u64, what: What) -> Result<(), TrainError> {
        let wall_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let payload = Event { wall_time, step: step as i64, what: Some(what) }.encode_to_vec();
        let len = (payload.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(payload.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&payload);
        record.extend_from_slice(&masked_crc(&payload).to_le_bytes());
        // One write per record: a reader never sees half of one, short of a crash.
        self.file.write_all(&record).map_err(TrainError::io("append to", &self.path))?;
        self.file.flush().map_err(TrainError::io("flush", &self.path))
    }

    /// Scalars at `step` under their tags.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<(), TrainError> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue { tag: tag.clone(), simple_value: *v as f32 })
            .collect::<Vec<_>>();
        if value.is_empty() {
            return Ok(());
        }
        self.write(step, What::Summary(Summary { value }))
    }

    /// A step's record as scalars: `train/…` (loss, per modality, diffusion), `eval/…` when
    /// it evaluated, `optim/lr`, `optim/grad_norm`, `perf/…`.
    pub fn record(&mut self, r: &StepRecord) -> Result<(), TrainError> {
        self.scalars(r.step, &scalars_of(r))
    }
}

/// The tags and values of one step record (absent values left out; [`EventWriter::scalars`]
/// drops non-finite ones).
pub fn scalars_of(r: &StepRecord) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = Vec::new();
    let mut put = |tag: &str, x: Option<f64>| {
        if let Some(x) = x {
            v.push((tag.to_string(), x));
        }
    };
    put("train/loss", r.loss);
    put("train/loss_text", r.loss_text);
    put("train/loss_image", r.loss_image);
    put("train/loss_speech", r.loss_speech);
    put("train/loss_diffusion", r.loss_diffusion);
    if let Some(e) = &r.eval {
        put("eval/loss", e.loss);
        put("eval/loss_text", e.text);
        put("eval/loss_image", e.image);
        put("eval/loss_speech", e.speech);
        put("eval/loss_diffusion", e.diffusion);
    }
    put("optim/lr", Some(r.lr));
    put("optim/grad_norm", Some(r.grad_norm));
    put("perf/tokens_per_s", Some(r.tokens_per_s));
    put("perf/mfu", r.mfu);
    put("perf/comm_s", r.comm_s);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TFRecord's masked CRC-32C of known inputs (the values TensorFlow's
    /// `masked_crc32c` gives), and a record's framing.
    #[test]
    fn records_are_framed_with_masked_crc32c() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283, "CRC-32C check value");
        assert_eq!(masked_crc(&[]), 0xa282_ead8);
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = EventWriter::create(dir.path(), Some(4)).expect("writer");
        w.scalars(5, &[("train/loss".into(), 2.5), ("skip".into(), f64::NAN)]).expect("scalars");
        let bytes = std::fs::read(w.path()).expect("read");
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")),
                masked_crc(&bytes[at..at + 8])
            );
            let payload = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().expect("4"));
            assert_eq!(crc, masked_crc(payload));
            events.push(Event::decode(payload).expect("an Event"));
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion("brain.Event:2".into())));
        assert_eq!((events[1].step, &events[1].what), (5, &Some(What::SessionLog(SessionLog { status: 1 }))));
        let Some(What::Summary(s)) = &events[2].what else { panic!("{:?}", events[2]) };
        assert_eq!(s.value, vec![SummaryValue { tag: "train/loss".into(), simple_value: 2.5 }], "NaN left out");
    }
}

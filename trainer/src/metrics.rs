//! Step metrics: the JSONL record, the console line, and the PNG plot of per-modality losses.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Per-modality values in modality order (text, image, speech); None where the batch had none.
pub type PerModality = [Option<f64>; 3];

pub const MODALITY_NAMES: [&str; 3] = ["text", "image", "speech"];

/// One optimizer step, as written to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// The objective: mean next-token loss over all loss-bearing tokens of the step, plus
    /// λ·(diffusion loss) with latent images (None if not finite).
    pub loss: Option<f64>,
    pub loss_text: Option<f64>,
    pub loss_image: Option<f64>,
    pub loss_speech: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Input positions processed this step (all micro-batches, all ranks).
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilization (CUDA only).
    pub mfu: Option<f64>,
    /// True when the update was dropped because of a NaN / inf.
    #[serde(default)]
    pub skipped: bool,
    /// Held-out losses when an evaluation ran at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
    /// Transfusion: mean over the step's images of each image's noise-prediction MSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_diffusion: Option<f64>,
    /// The same per timestep bucket (`t * 4 / T`: quarters of the schedule, least noisy first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diffusion_buckets: Vec<Option<f64>>,
    /// Data parallel: seconds this step waited on communication after backward (the
    /// gradient buckets not hidden behind it, the loss reduction and, under ZeRO, the norm and
    /// the parameter all-gather).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_s: Option<f64>,
    /// Data parallel: gradient buckets whose reduction started during backward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets_overlapped: Option<u64>,
}

/// Held-out loss per modality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub loss: Option<f64>,
    pub text: Option<f64>,
    pub image: Option<f64>,
    pub speech: Option<f64>,
    /// Loss-bearing target tokens per modality.
    pub tokens: [i64; 3],
    /// Transfusion: held-out diffusion loss (mean over images, fixed noise draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusion: Option<f64>,
}

impl EvalRecord {
    pub fn from_sums(sums: [f64; 3], tokens: [i64; 3]) -> Self {
        let per = |i: usize| (tokens[i] > 0).then(|| sums[i] / tokens[i] as f64);
        let total: i64 = tokens.iter().sum();
        EvalRecord {
            loss: (total > 0).then(|| sums.iter().sum::<f64>() / total as f64),
            text: per(0),
            image: per(1),
            speech: per(2),
            tokens,
            diffusion: None,
        }
    }

    pub fn per_modality(&self) -> PerModality {
        [self.text, self.image, self.speech]
    }
}

impl StepRecord {
    pub fn per_modality(&self) -> PerModality {
        [self.loss_text, self.loss_image, self.loss_speech]
    }

    /// `step   120 | loss 3.412 | text 4.101 image 2.950 speech 3.120 | lr 2.9e-3 | 41.2k tok/s`
    pub fn console_line(&self, total_steps: u64) -> String {
        let width = total_steps.to_string().len();
        let loss = self.loss.map_or("nan".to_string(), |l| format!("{l:.4}"));
        let mut s = format!("step {:>width$}/{total_steps} | loss {loss} |", self.step);
        for (name, v) in MODALITY_NAMES.iter().zip(self.per_modality()) {
            match v {
                Some(v) => s.push_str(&format!(" {name} {v:.4}")),
                None => s.push_str(&format!(" {name} -")),
            }
        }
        s.push_str(&format!(
            " | lr {:.2e} | gnorm {:.2} | {} tok/s",
            self.lr,
            self.grad_norm,
            human(self.tokens_per_s)
        ));
        if let Some(m) = self.mfu {
            s.push_str(&format!(" | mfu {:.1}%", 100.0 * m));
        }
        if let Some(d) = self.loss_diffusion {
            s.push_str(&format!(" | ddpm {d:.4}"));
            let b: Vec<String> =
                self.diffusion_buckets.iter().map(|v| v.map_or("-".to_string(), |v| format!("{v:.3}"))).collect();
            if !b.is_empty() {
                s.push_str(&format!(" (t-buckets {})", b.join("/")));
            }
        }
        if self.skipped {
            s.push_str(" | SKIPPED (non-finite)");
        }
        if let Some(e) = &self.eval {
            s.push_str(" | eval");
            for (name, v) in MODALITY_NAMES.iter().zip(e.per_modality()) {
                if let Some(v) = v {
                    s.push_str(&format!(" {name} {v:.4}"));
                }
            }
            if let Some(d) = e.diffusion {
                s.push_str(&format!(" ddpm {d:.4}"));
            }
        }
        s
    }
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Appends step records to `metrics.jsonl`, keeps them for the plot.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    plot_path: PathBuf,
    pub records: Vec<StepRecord>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, keeping only records up to `keep_through` (a resumed run
    /// drops what was logged after its checkpoint, so the file tells one consistent story).
    pub fn open(dir: &Path, keep_through: u64) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        let mut records = Vec::new();
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(TrainError::io("read metrics", &path))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let r: StepRecord = serde_json::from_str(line).map_err(|e| TrainError::Data {
                    path: path.display().to_string(),
                    msg: format!("line {}: {e}", i + 1),
                })?;
                if r.step <= keep_through {
                    records.push(r);
                }
            }
        }
        let log = MetricsLog { plot_path: dir.join("losses.png"), path, records };
        log.rewrite()?;
        Ok(log)
    }

    fn rewrite(&self) -> Result<(), TrainError> {
        let mut text = String::new();
        for r in &self.records {
            text.push_str(&serde_json::to_string(r).unwrap_or_default());
            text.push('\n');
        }
        crate::checkpoint::write_atomic(&self.path, text.as_bytes())
    }

    pub fn append(&mut self, r: StepRecord) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(TrainError::io("open metrics", &self.path))?;
        let line = serde_json::to_string(&r)
            .map_err(|e| TrainError::Data { path: self.path.display().to_string(), msg: e.to_string() })?;
        writeln!(f, "{line}").map_err(TrainError::io("append metrics", &self.path))?;
        self.records.push(r);
        Ok(())
    }

    pub fn plot(&self, title: &str) -> Result<(), TrainError> {
        plot_losses(&self.records, &self.plot_path, title)
    }
}

/// Registers the bundled ASCII font once (no system fonts needed).
pub(crate) fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws a `w`×`h` plot in memory and writes it as PNG atomically (a temporary file, then a
/// rename). `image` encodes it: plotters' own encoder would build a second, older `image`.
pub(crate) fn write_png(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let err = |e: String| TrainError::Plot { path: path.to_path_buf(), msg: e };
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let tmp = path.with_extension("png.tmp.png");
    image::save_buffer_with_format(&tmp, &rgb, w, h, image::ExtendedColorType::Rgb8, image::ImageFormat::Png)
        .map_err(|e| err(format!("write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(TrainError::io("rename plot", path))
}

/// Train loss per modality (lines) and held-out loss (dots), plus the diffusion loss in the
/// Transfusion setting, written atomically as PNG.
pub fn plot_losses(records: &[StepRecord], path: &Path, title: &str) -> Result<(), TrainError> {
    ensure_font();
    let err = |e: String| TrainError::Plot { path: path.to_path_buf(), msg: e };
    let colors = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44)];
    let max_step = records.iter().map(|r| r.step).max().unwrap_or(1).max(1);
    let values = records
        .iter()
        .flat_map(|r| {
            r.per_modality()
                .into_iter()
                .chain(r.eval.iter().flat_map(|e| e.per_modality()))
                .chain([r.loss_diffusion, r.eval.as_ref().and_then(|e| e.diffusion)])
        })
        .flatten()
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo.max(0.0) * 0.95, hi * 1.05 + 1e-6) } else { (0.0, 1.0) };
    write_png(path, (900, 540), |root| {
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u64..max_step, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (m, name) in MODALITY_NAMES.iter().enumerate() {
            let color = colors[m];
            let train: Vec<(u64, f64)> = records
                .iter()
                .filter_map(|r| r.per_modality()[m].filter(|v| v.is_finite()).map(|v| (r.step, v)))
                .collect();
            if !train.is_empty() {
                chart
                    .draw_series(LineSeries::new(train, color.stroke_width(2)))
                    .map_err(|e| err(e.to_string()))?
                    .label(format!("{name} (train)"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            let eval: Vec<(u64, f64)> = records
                .iter()
                .filter_map(|r| {
                    r.eval.as_ref().and_then(|e| e.per_modality()[m]).filter(|v| v.is_finite()).map(|v| (r.step, v))
                })
                .collect();
            if !eval.is_empty() {
                chart
                    .draw_series(eval.into_iter().map(|p| Circle::new(p, 5, color.filled())))
                    .map_err(|e| err(e.to_string()))?
                    .label(format!("{name} (held-out)"))
                    .legend(move |(x, y)| Circle::new((x + 9, y), 5, color.filled()));
            }
        }
        let purple = RGBColor(148, 103, 189);
        let diffusion: Vec<(u64, f64)> =
            records.iter().filter_map(|r| r.loss_diffusion.filter(|v| v.is_finite()).map(|v| (r.step, v))).collect();
        if !diffusion.is_empty() {
            chart
                .draw_series(LineSeries::new(diffusion, purple.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label("diffusion (train)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], purple.stroke_width(2)));
        }
        let held: Vec<(u64, f64)> = records
            .iter()
            .filter_map(|r| r.eval.as_ref().and_then(|e| e.diffusion).filter(|v| v.is_finite()).map(|v| (r.step, v)))
            .collect();
        if !held.is_empty() {
            chart
                .draw_series(held.into_iter().map(|p| Circle::new(p, 5, purple.filled())))
                .map_err(|e| err(e.to_string()))?
                .label("diffusion (held-out)")
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, purple.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, text: f64) -> StepRecord {
        StepRecord {
            step,
            loss: Some(text),
            loss_text: Some(text),
            loss_image: Some(text * 0.8),
            loss_speech: None,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 100,
            tokens_per_s: 1234.0,
            mfu: None,
            skipped: false,
            eval: step.is_multiple_of(2).then(|| EvalRecord::from_sums([text * 10.0, 8.0, 0.0], [10, 10, 0])),
            loss_diffusion: step.is_multiple_of(3).then_some(0.5),
            diffusion_buckets: if step.is_multiple_of(3) {
                vec![Some(0.1), None, Some(0.6), Some(0.9)]
            } else {
                vec![]
            },
            comm_s: None,
            buckets_overlapped: None,
        }
    }

    #[test]
    fn plot_renders_with_bundled_font_and_log_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = MetricsLog::open(dir.path(), 0).expect("open");
        for s in 1..=6 {
            log.append(rec(s, 5.0 - s as f64 * 0.3)).expect("append");
        }
        log.plot("tiny mot").expect("plot");
        let png = std::fs::read(dir.path().join("losses.png")).expect("png");
        assert_eq!(&png[1..4], b"PNG");
        let reopened = MetricsLog::open(dir.path(), 4).expect("reopen");
        assert_eq!(reopened.records.len(), 4);
        assert_eq!(reopened.records[3], rec(4, 5.0 - 1.2));
        assert!(rec(3, 2.0).console_line(100).contains("text 2.0000 image 1.6000 speech -"));
        assert!(rec(3, 2.0).console_line(100).contains("ddpm 0.5000 (t-buckets 0.100/-/0.600/0.900)"));
        assert_eq!(reopened.records[2], rec(3, 5.0 - 0.9));
    }
}

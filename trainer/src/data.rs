//! Where batches come from: the `BatchSource` seam, and a synthetic source for tests.
//!
//! The trainer only needs `next_batch`, a serializable position (`state` / `restore`, for
//! exact resume) and the vocabulary. The shard loader implements it in `loader.rs`; the
//! synthetic source below generates deterministic multimodal documents with cross-modal
//! structure (the caption's class decides the image codes and the speech units), so a
//! small model can learn it in a few steps.

use motley_shards::{Batch, Document, Modality, Segment, SegmentData, Vocab};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::TrainError;

/// A stream of fixed-shape batches with an exact, serializable position.
pub trait BatchSource: Send {
    fn next_batch(&mut self) -> Result<Batch, TrainError>;
    /// Position in the stream; `restore(state())` makes the next batches identical.
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), TrainError>;
    fn vocab(&self) -> &Vocab;
    /// The tokenizer files the data was made with, as (modality, local path); none for
    /// synthetic data.
    fn tokenizer_files(&self) -> Vec<(String, std::path::PathBuf)> {
        Vec::new()
    }
}

/// Deterministic synthetic documents: `bos caption boi image eoi bosp speech eosp eos`
/// (image and speech in either order), packed into rows, truncated at row ends.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    seed: u64,
    batch_size: usize,
    seq_len: usize,
    next_doc: u64,
    vocab: Vocab,
    /// Transfusion setting: images as `latent_dim`-wide patch vectors instead of codes.
    latent_dim: Option<u32>,
}

const CLASSES: u32 = 8;

impl SyntheticSource {
    pub fn new(seed: u64, batch_size: usize, seq_len: usize) -> Self {
        SyntheticSource {
            seed,
            batch_size,
            seq_len,
            next_doc: 0,
            vocab: Vocab::build(32, 64, 24, None),
            latent_dim: None,
        }
    }

    /// The same documents with each image as 12 continuous patch vectors of `dim` values
    /// (a class-dependent pattern plus noise). For writing a latent corpus
    /// ([`crate::loader::write_synthetic_corpus_latent`]); `next_batch` packs token segments only.
    pub fn with_latent_images(mut self, dim: u32) -> Self {
        self.vocab = Vocab::build(32, 0, 24, Some(dim));
        self.latent_dim = Some(dim);
        self
    }

    /// Document `index` as segments of per-modality local ids (what ingest would store).
    pub fn document(&self, index: u64) -> Document {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
        let size = |m: Modality| self.vocab.modality(m).map_or(1, |v| v.vocab_size.max(1));
        let class: u32 = rng.random_range(0..CLASSES);
        let mut caption = vec![class];
        for _ in 0..rng.random_range(2..6) {
            // Filler words drawn from the class's own small word set.
            caption.push(CLASSES + (class * 3 + rng.random_range(0..3)) % (size(Modality::Text) - CLASSES));
        }
        let image: Vec<u32> = (0..12u32)
            .map(|i| {
                let noise = if rng.random_bool(0.1) { rng.random_range(0..size(Modality::Image)) } else { 0 };
                (class * 7 + i * 3 + noise) % size(Modality::Image)
            })
            .collect();
        let mut u = rng.random_range(0..size(Modality::Speech));
        let speech: Vec<u32> = (0..rng.random_range(6..12))
            .map(|_| {
                let unit = u;
                u = (u + class + 1) % size(Modality::Speech);
                unit
            })
            .collect();
        let image = match self.latent_dim {
            None => Segment::tokens(Modality::Image, image),
            Some(dim) => {
                let data = (0..12u32)
                    .flat_map(|i| (0..dim).map(move |j| (i, j)))
                    .map(|(i, j)| {
                        let v = ((class * 7 + i * 3 + j * 5) % 9) as f32 / 4.0 - 1.0;
                        half::f16::from_f32(v + rng.random_range(-0.1f32..0.1))
                    })
                    .collect();
                Segment::latent(Modality::Image, dim, data)
            }
        };
        let speech = Segment::tokens(Modality::Speech, speech);
        let mut segments = vec![Segment::tokens(Modality::Text, caption)];
        if rng.random_bool(0.5) {
            segments.extend([image, speech]);
        } else {
            segments.extend([speech, image]);
        }
        Document::new(segments)
    }

    /// The document flattened to (global id, modality): `bos text boi image eoi bosp speech eosp eos`.
    fn flat_document(&self, index: u64) -> Vec<(u32, Modality)> {
        let sp = |name: &str| self.vocab.special(name).unwrap_or(0);
        let mut out = vec![(sp("bos"), Modality::Text)];
        for seg in self.document(index).segments {
            let SegmentData::Tokens(ids) = &seg.data else { continue };
            let off = self.vocab.modality(seg.modality).map_or(0, |v| v.offset);
            let (open, close) = match seg.modality {
                Modality::Text => (None, None),
                Modality::Image => (Some("boi"), Some("eoi")),
                Modality::Speech => (Some("bosp"), Some("eosp")),
            };
            out.extend(open.map(|o| (sp(o), Modality::Text)));
            out.extend(ids.iter().map(|&id| (off + id, seg.modality)));
            out.extend(close.map(|c| (sp(c), Modality::Text)));
        }
        out.push((sp("eos"), Modality::Text));
        out
    }
}

impl BatchSource for SyntheticSource {
    fn next_batch(&mut self) -> Result<Batch, TrainError> {
        let (b, t) = (self.batch_size, self.seq_len);
        let mut batch = Batch { batch_size: b, seq_len: t, ..Batch::default() };
        for _ in 0..b {
            // One row = T+1 stream positions; inputs are [0, T), targets [1, T].
            let mut row: Vec<(u32, Modality, u32, u32)> = Vec::with_capacity(t + 1); // id, modality, doc, pos
            let mut doc_in_row = 0u32;
            while row.len() < t + 1 {
                let doc = self.flat_document(self.next_doc);
                self.next_doc += 1;
                for (pos, (id, m)) in doc.into_iter().enumerate() {
                    if row.len() == t + 1 {
                        break;
                    }
                    row.push((id, m, doc_in_row, pos as u32));
                }
                doc_in_row += 1;
            }
            let mut segment = 0u32;
            for i in 0..t {
                let (x, y) = (row[i], row[i + 1]);
                if i > 0 && (row[i - 1].1 != x.1 || row[i - 1].2 != x.2) {
                    segment += 1;
                }
                batch.inputs.push(x.0);
                batch.targets.push(y.0);
                batch.modality.push(x.1 as u8);
                batch.target_modality.push(y.1 as u8);
                batch.positions.push(x.3);
                batch.doc_ids.push(x.2);
                batch.segment_ids.push(segment);
                batch.loss_mask.push(u8::from(x.2 == y.2));
            }
        }
        Ok(batch)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "synthetic": { "seed": self.seed, "next_doc": self.next_doc } })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), TrainError> {
        let s = &state["synthetic"];
        match (s["seed"].as_u64(), s["next_doc"].as_u64()) {
            (Some(seed), Some(next)) if seed == self.seed => {
                self.next_doc = next;
                Ok(())
            }
            _ => Err(TrainError::Data {
                path: "synthetic".into(),
                msg: format!("loader state {state} does not belong to a synthetic source with seed {}", self.seed),
            }),
        }
    }

    fn vocab(&self) -> &Vocab {
        &self.vocab
    }
}

/// One packed batch of benchmark-sized documents over `vocab`: each document is a caption
/// (8–128 text tokens), an image (`image_len` codes) and an utterance (32–256 speech units) in
/// random order, wrapped in the usual specials, packed and cut at row ends. Deterministic in `seed`.
pub fn mixed_batch(vocab: &Vocab, batch_size: usize, seq_len: usize, image_len: usize, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let sp = |name: &str| vocab.special(name).unwrap_or(0);
    let block = |m: Modality| vocab.modality(m).map_or((0, 1), |v| (v.offset, v.vocab_size.max(1)));
    let mut batch = Batch { batch_size, seq_len, ..Batch::default() };
    for _ in 0..batch_size {
        let mut row: Vec<(u32, Modality, u32, u32)> = Vec::with_capacity(seq_len + 1);
        let mut doc = 0u32;
        while row.len() < seq_len + 1 {
            let mut d: Vec<(u32, Modality)> = vec![(sp("bos"), Modality::Text)];
            let mut parts = [
                (Modality::Text, rng.random_range(8..128)),
                (Modality::Image, image_len),
                (Modality::Speech, rng.random_range(32..256)),
            ];
            if rng.random_bool(0.5) {
                parts.swap(1, 2);
            }
            for (m, len) in parts {
                let (off, size) = block(m);
                let (open, close) = match m {
                    Modality::Text => (None, None),
                    Modality::Image => (Some("boi"), Some("eoi")),
                    Modality::Speech => (Some("bosp"), Some("eosp")),
                };
                d.extend(open.map(|o| (sp(o), Modality::Text)));
                d.extend((0..len).map(|_| (off + rng.random_range(0..size), m)));
                d.extend(close.map(|c| (sp(c), Modality::Text)));
            }
            d.push((sp("eos"), Modality::Text));
            for (pos, (id, m)) in d.into_iter().enumerate() {
                if row.len() == seq_len + 1 {
                    break;
                }
                row.push((id, m, doc, pos as u32));
            }
            doc += 1;
        }
        for i in 0..seq_len {
            let (x, y) = (row[i], row[i + 1]);
            batch.inputs.push(x.0);
            batch.targets.push(y.0);
            batch.modality.push(x.1 as u8);
            batch.target_modality.push(y.1 as u8);
            batch.positions.push(x.3);
            batch.doc_ids.push(x.2);
            batch.segment_ids.push(0);
            batch.loss_mask.push(u8::from(x.2 == y.2));
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_batches_are_well_formed_and_resumable() {
        let mut a = SyntheticSource::new(1, 3, 40);
        let first = a.next_batch().expect("batch");
        assert_eq!(first.inputs.len(), 120);
        assert_eq!(&first.inputs[1..40], &first.targets[0..39]);
        for m in 0..3u8 {
            assert!(first.modality.contains(&m));
        }
        let state = a.state();
        let second = a.next_batch().expect("batch");
        let mut b = SyntheticSource::new(1, 3, 40);
        b.restore(&state).expect("restore");
        assert_eq!(b.next_batch().expect("batch"), second);
        assert!(SyntheticSource::new(2, 3, 40).restore(&state).is_err());
    }
}

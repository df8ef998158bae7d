//! Where batches come from: the `BatchSource` seam, and a synthetic source for tests.
//!
//! The trainer only needs `next_batch`, a serializable position (`state` / `restore`, for
//! exact resume) and the vocabulary. The shard loader implements it in `loader.rs`; the
//! synthetic source below generates deterministic multimodal documents with cross-modal
//! structure (the caption's class decides the image codes and the speech units), so a
//! small model can learn it in a few steps.

use motley_shards::{Batch, Modality, Vocab};
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
}

const CLASSES: u32 = 8;

impl SyntheticSource {
    pub fn new(seed: u64, batch_size: usize, seq_len: usize) -> Self {
        SyntheticSource { seed, batch_size, seq_len, next_doc: 0, vocab: Vocab::build(32, 64, 24, None) }
    }

    /// One document as (global id, modality) pairs.
    fn document(&self, index: u64) -> Vec<(u32, Modality)> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
        let sp = |name: &str| self.vocab.special(name).unwrap_or(0);
        let off = |m: Modality| self.vocab.modality(m).map_or(0, |v| v.offset);
        let size = |m: Modality| self.vocab.modality(m).map_or(1, |v| v.vocab_size.max(1));
        let class: u32 = rng.random_range(0..CLASSES);
        let mut doc = vec![(sp("bos"), Modality::Text), (class, Modality::Text)];
        for _ in 0..rng.random_range(2..6) {
            // Filler words drawn from the class's own small word set.
            let w = CLASSES + (class * 3 + rng.random_range(0..3)) % (size(Modality::Text) - CLASSES);
            doc.push((w, Modality::Text));
        }
        let image = |rng: &mut ChaCha8Rng, doc: &mut Vec<(u32, Modality)>| {
            doc.push((sp("boi"), Modality::Text));
            for i in 0..12u32 {
                let noise = if rng.random_bool(0.1) { rng.random_range(0..size(Modality::Image)) } else { 0 };
                let code = (class * 7 + i * 3 + noise) % size(Modality::Image);
                doc.push((off(Modality::Image) + code, Modality::Image));
            }
            doc.push((sp("eoi"), Modality::Text));
        };
        let speech = |rng: &mut ChaCha8Rng, doc: &mut Vec<(u32, Modality)>| {
            doc.push((sp("bosp"), Modality::Text));
            let mut u = rng.random_range(0..size(Modality::Speech));
            for _ in 0..rng.random_range(6..12) {
                doc.push((off(Modality::Speech) + u, Modality::Speech));
                u = (u + class + 1) % size(Modality::Speech);
            }
            doc.push((sp("eosp"), Modality::Text));
        };
        if rng.random_bool(0.5) {
            image(&mut rng, &mut doc);
            speech(&mut rng, &mut doc);
        } else {
            speech(&mut rng, &mut doc);
            image(&mut rng, &mut doc);
        }
        doc.push((sp("eos"), Modality::Text));
        doc
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
                let doc = self.document(self.next_doc);
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

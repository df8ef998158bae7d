//! The data model every crate shares: modalities, segments, documents and the global vocabulary.
//!
//! Ingest builds `Document`s from tokenizer output, the writer stores them, the reader hands
//! them back as borrowed views, and the loader flattens them into global token ids using
//! the corpus's [`Vocab`].

use half::f16;
use serde::{Deserialize, Serialize};

/// A modality tag. Stored as one byte on disk; values are stable (room for more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Modality {
    Text = 0,
    Image = 1,
    Speech = 2,
}

impl Modality {
    pub const ALL: [Modality; 3] = [Modality::Text, Modality::Image, Modality::Speech];
    /// Number of modalities the trainer allocates towers for.
    pub const COUNT: usize = 3;

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Modality::Text),
            1 => Some(Modality::Image),
            2 => Some(Modality::Speech),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Image => "image",
            Modality::Speech => "speech",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Small per-segment metadata: image grid, frame rate, where it came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Image code / patch grid (rows, cols) when the segment is an image.
    pub grid: Option<(u16, u16)>,
    /// Units (or frames) per second for speech.
    pub frame_rate: Option<f32>,
    /// Source reference, e.g. `images/003.png` or `train.parquet#17`.
    pub source: Option<String>,
}

/// The payload of a segment: discrete per-modality ids, or continuous vectors.
#[derive(Debug, Clone, PartialEq)]
pub enum SegmentData {
    /// Per-modality *local* ids in `[0, vocab_size)`; the loader maps them to global ids.
    Tokens(Vec<u32>),
    /// `n` vectors of `dim` f16 values, row-major (latent image patches).
    Latent { dim: u32, data: Vec<f16> },
}

impl SegmentData {
    /// Number of sequence positions this segment occupies (tokens or patch vectors).
    pub fn len(&self) -> usize {
        match self {
            SegmentData::Tokens(t) => t.len(),
            SegmentData::Latent { dim, data } => {
                if *dim == 0 {
                    0
                } else {
                    data.len() / *dim as usize
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One modality run inside a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub modality: Modality,
    pub data: SegmentData,
    pub meta: SegmentMeta,
}

impl Segment {
    pub fn tokens(modality: Modality, ids: Vec<u32>) -> Self {
        Segment { modality, data: SegmentData::Tokens(ids), meta: SegmentMeta::default() }
    }

    pub fn latent(modality: Modality, dim: u32, data: Vec<f16>) -> Self {
        Segment { modality, data: SegmentData::Latent { dim, data }, meta: SegmentMeta::default() }
    }

    pub fn with_meta(mut self, meta: SegmentMeta) -> Self {
        self.meta = meta;
        self
    }
}

/// An ordered list of segments (e.g. caption text, then an image, then more text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Document {
    pub segments: Vec<Segment>,
}

impl Document {
    pub fn new(segments: Vec<Segment>) -> Self {
        Document { segments }
    }
}

/// How one modality's local ids or vectors are described in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModalityVocab {
    pub modality: Modality,
    /// Discrete vocabulary size (0 for continuous-only modalities).
    pub vocab_size: u32,
    /// Vector dimension when segments are continuous (latent patches), else None.
    pub latent_dim: Option<u32>,
    /// First global id of this modality's block: global = offset + local.
    pub offset: u32,
    /// Tokenizer that produced the ids (file name inside the corpus or a description).
    #[serde(default)]
    pub tokenizer: Option<String>,
}

/// The corpus's vocabulary description: one global id space for the trainer.
///
/// Layout: `[text ids][specials][image codes][speech units]`, each block's start recorded
/// explicitly in `offset` so readers never infer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vocab {
    pub modalities: Vec<ModalityVocab>,
    /// Global ids of the structural specials (routed to the text tower), by name (`pad`, `bos`, `eos`, `boi`, `eoi`, `bosp`, `eosp`).
    pub specials: std::collections::BTreeMap<String, u32>,
    /// Total size of the global id space.
    pub total_size: u32,
}

/// Names of the structural specials, in global-id order after the text block.
pub const SPECIAL_NAMES: [&str; 7] = ["pad", "bos", "eos", "boi", "eoi", "bosp", "eosp"];

impl Vocab {
    /// Lays out the global id space from per-modality sizes. `image_latent_dim` marks image
    /// segments as continuous (Transfusion setting); they still get a (possibly empty) block.
    pub fn build(text_vocab: u32, image_vocab: u32, speech_vocab: u32, image_latent_dim: Option<u32>) -> Self {
        let mut specials = std::collections::BTreeMap::new();
        for (i, name) in SPECIAL_NAMES.iter().enumerate() {
            specials.insert((*name).to_string(), text_vocab + i as u32);
        }
        let image_offset = text_vocab + SPECIAL_NAMES.len() as u32;
        let speech_offset = image_offset + image_vocab;
        Vocab {
            modalities: vec![
                ModalityVocab {
                    modality: Modality::Text,
                    vocab_size: text_vocab,
                    latent_dim: None,
                    offset: 0,
                    tokenizer: None,
                },
                ModalityVocab {
                    modality: Modality::Image,
                    vocab_size: image_vocab,
                    latent_dim: image_latent_dim,
                    offset: image_offset,
                    tokenizer: None,
                },
                ModalityVocab {
                    modality: Modality::Speech,
                    vocab_size: speech_vocab,
                    latent_dim: None,
                    offset: speech_offset,
                    tokenizer: None,
                },
            ],
            specials,
            total_size: speech_offset + speech_vocab,
        }
    }

    pub fn modality(&self, m: Modality) -> Option<&ModalityVocab> {
        self.modalities.iter().find(|v| v.modality == m)
    }

    /// Global id of a named special (`"bos"`, `"boi"`, ...).
    pub fn special(&self, name: &str) -> Option<u32> {
        self.specials.get(name).copied()
    }

    /// Which modality a global id belongs to (specials count as text).
    pub fn modality_of(&self, global: u32) -> Modality {
        for v in &self.modalities {
            // u64: a vocabulary read from someone else's manifest may overflow u32 here.
            if global >= v.offset && (global as u64) < v.offset as u64 + v.vocab_size as u64 {
                return v.modality;
            }
        }
        Modality::Text
    }

    /// Checks that the global id space is well formed (docs/FORMAT.md, section 6.1): each
    /// modality listed once, every block inside `0..total_size`, no two blocks overlapping,
    /// every special inside the id space, outside every block and distinct, latent dims > 0.
    /// Readers apply it to every manifest and shard meta block, since the loader turns local
    /// ids into global ones with these offsets.
    pub fn validate(&self) -> Result<(), String> {
        let total = self.total_size as u64;
        let mut blocks: Vec<(u64, u64, String)> = Vec::new();
        for (i, v) in self.modalities.iter().enumerate() {
            if self.modalities[..i].iter().any(|o| o.modality == v.modality) {
                return Err(format!("modality {} is listed twice", v.modality));
            }
            let end = v.offset as u64 + v.vocab_size as u64;
            if end > total {
                return Err(format!(
                    "{} block {}..{end} overflows the id space of total_size {total}",
                    v.modality, v.offset
                ));
            }
            if v.latent_dim == Some(0) {
                return Err(format!("{} has latent_dim 0", v.modality));
            }
            if v.vocab_size > 0 {
                blocks.push((v.offset as u64, end, format!("{} block {}..{end}", v.modality, v.offset)));
            }
        }
        for (i, (a0, a1, a)) in blocks.iter().enumerate() {
            for (b0, b1, b) in &blocks[i + 1..] {
                if a0 < b1 && b0 < a1 {
                    return Err(format!("{a} overlaps {b}"));
                }
            }
        }
        for (name, &id) in &self.specials {
            if id as u64 >= total {
                return Err(format!("special {name:?} = {id} is outside the id space of total_size {total}"));
            }
            if let Some((_, _, b)) = blocks.iter().find(|(s, e, _)| (*s..*e).contains(&(id as u64))) {
                return Err(format!("special {name:?} = {id} lies inside the {b}"));
            }
            if let Some((other, _)) = self.specials.iter().find(|(n, v)| **v == id && *n < name) {
                return Err(format!("specials {other:?} and {name:?} share id {id}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_layout_is_contiguous() {
        let v = Vocab::build(1000, 256, 500, None);
        assert_eq!(v.special("bos"), Some(1001));
        assert_eq!(v.modality(Modality::Image).map(|m| m.offset), Some(1007));
        assert_eq!(v.modality(Modality::Speech).map(|m| m.offset), Some(1263));
        assert_eq!(v.total_size, 1763);
        assert_eq!(v.modality_of(5), Modality::Text);
        assert_eq!(v.modality_of(1001), Modality::Text);
        assert_eq!(v.modality_of(1007), Modality::Image);
        assert_eq!(v.modality_of(1762), Modality::Speech);
        assert_eq!(v.validate(), Ok(()));
        assert_eq!(Vocab::build(0, 0, 0, Some(4)).validate(), Ok(()));
    }

    #[test]
    fn bad_vocabularies_are_rejected() {
        let good = Vocab::build(1000, 256, 500, None);
        let broken = |f: &dyn Fn(&mut Vocab)| {
            let mut v = good.clone();
            f(&mut v);
            v.validate().expect_err("must be rejected")
        };
        let e = broken(&|v| v.modalities[1].offset = 990);
        assert!(e.contains("overlaps") || e.contains("inside"), "{e}");
        let e = broken(&|v| v.modalities[2].offset = u32::MAX - 10);
        assert!(e.contains("overflows"), "{e}");
        let e = broken(&|v| v.total_size = 1500);
        assert!(e.contains("overflows"), "{e}");
        let e = broken(&|v| v.modalities[1].vocab_size = 300);
        assert!(e.contains("overlaps"), "{e}");
        let e = broken(&|v| {
            v.specials.insert("bos".into(), 5);
        });
        assert!(e.contains("inside the text block"), "{e}");
        let e = broken(&|v| {
            v.specials.insert("eos".into(), 1001);
        });
        assert!(e.contains("share id 1001"), "{e}");
        let e = broken(&|v| {
            v.specials.insert("pad".into(), 5000);
        });
        assert!(e.contains("outside the id space"), "{e}");
        let e = broken(&|v| v.modalities.push(v.modalities[0].clone()));
        assert!(e.contains("listed twice"), "{e}");
        let e = broken(&|v| v.modalities[1].latent_dim = Some(0));
        assert!(e.contains("latent_dim 0"), "{e}");
        // A huge block no longer overflows u32 arithmetic in modality_of.
        let mut v = good.clone();
        v.modalities[2].offset = u32::MAX - 1;
        assert_eq!(v.modality_of(u32::MAX - 1), Modality::Speech);
    }
}

//! WebDataset source reader: a POSIX tar whose consecutive members sharing a key form one
//! sample (`000123.jpg` + `000123.txt` → an image with its caption), the layout of img2dataset,
//! LAION / DataComp shards and Megatron-Energon's WebDataset corpora.
//!
//! A member's key is its path up to the first `.` of its file name, the rest its extension
//! (`shard/000123.seg.png` → key `shard/000123`, extension `seg.png`), as in the `webdataset`
//! Python library. Per sample, the media member is the one whose extension is `image_field` /
//! `audio_field` when set, else the first whose last extension is an image (audio) format; the
//! caption / transcript (or, for a text source, the document) is the member with extension
//! `text_field` (default `txt`). Those members are read into memory a sample at a time, never
//! written to disk; other members (`.json`, `.cls`, …) are skipped unread. A tar that breaks
//! off (a bad header checksum, a truncated member) is one error at the byte offset where it
//! broke, after every sample before it. `*.tar.gz` / `*.tgz` shards are decompressed on the fly (gzip; byte
//! offsets are then those of the uncompressed tar).

use std::io::Read;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use motley_tokenizers::error::catch_panic;

use crate::error::{Reason, RecordError};
use crate::plan::{AUDIO_EXTENSIONS, IMAGE_EXTENSIONS};
use crate::recipe::SourceKind;
use crate::source::{Blob, Item, RawPart, RawRecord, ReadCtx};

/// The caption / transcript / document member's extension when `text_field` is not set.
pub const DEFAULT_TEXT_EXTENSION: &str = "txt";

/// One member of the current sample, read into memory.
struct Member {
    /// Extension after the key, lowercased (`jpg`, `seg.png`).
    ext: String,
    path: String,
    data: Vec<u8>,
}

/// Consecutive members with one key.
struct Sample {
    key: String,
    /// Where its first member's header starts in the tar.
    offset: u64,
    members: Vec<Member>,
}

/// `dir/000123.seg.PNG` → (`dir/000123`, `seg.png`); a name without a dot has no extension.
fn split_key(path: &str) -> (&str, String) {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    match path[name_start..].find('.') {
        Some(dot) => (&path[..name_start + dot], path[name_start + dot + 1..].to_ascii_lowercase()),
        None => (path, String::new()),
    }
}

fn rec_err(file: &Path, index: u64, offset: u64, reason: Reason, e: impl Into<String>) -> RecordError {
    RecordError {
        file: file.display().to_string(),
        record: Some(index),
        byte_offset: Some(offset),
        reason,
        error: e.into(),
    }
}

pub(crate) fn read_webdataset(
    ctx: &ReadCtx<'_>,
    file: &Arc<Path>,
    f: &mut dyn FnMut(Item) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let file_err = |reason: Reason, error: String| RecordError {
        file: file.display().to_string(),
        record: None,
        byte_offset: None,
        reason,
        error,
    };
    if ctx.spec.kind == SourceKind::Interleaved {
        // One error for the file, not one per sample.
        return f(Err(file_err(Reason::WrongType, "interleaved sources read JSONL only, not WebDataset tars".into())));
    }
    let handle = match std::fs::File::open(file) {
        Ok(h) => h,
        Err(e) => return f(Err(file_err(Reason::Io, format!("open: {e}")))),
    };
    // Offsets past the end (a member cut short and skipped unread) are reported as the end.
    let file_len = handle.metadata().map_or(u64::MAX, |m| m.len());
    let buffered = std::io::BufReader::with_capacity(1 << 20, handle);
    let reader: Box<dyn Read> = if crate::plan::is_gzipped_tar(file) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let mut archive = tar::Archive::new(reader);
    let mut entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return f(Err(rec_err(file, 0, 0, Reason::Io, format!("not a tar archive: {e}")))),
    };
    let text_ext = text_extension(ctx);
    let mut index = 0u64;
    let mut current: Option<Sample> = None;
    // Where the next header starts (after the last member read), for errors that break the tar.
    let mut next_offset = 0u64;
    loop {
        // The tar crate returns errors for the malformed headers we know of; the guard keeps any
        // it does not foresee to this file.
        let next = match catch_panic(|| entries.next()) {
            Ok(n) => n,
            Err(msg) => Some(Err(std::io::Error::other(format!("the tar reader panicked: {msg}")))),
        };
        let mut entry = match next {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                flush(ctx, file, &text_ext, &mut index, &mut current, f)?;
                let at = if crate::plan::is_gzipped_tar(file) { next_offset } else { next_offset.min(file_len) };
                return f(Err(rec_err(file, index, at, Reason::Io, format!("the tar breaks off here: {e}"))));
            }
        };
        let offset = entry.raw_header_position();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => return f(Err(rec_err(file, index, offset, Reason::Io, format!("member name: {e}")))),
        };
        let size = entry.size();
        let (key, ext) = split_key(&path);
        // Only members a record can use are read; the others (`.json`, `.cls`, a video next
        // to the image) are skipped by the tar reader without being held in memory.
        let mut data = Vec::new();
        if ext == text_ext || is_media(ctx, &ext) {
            data.reserve(size.min(64 << 20) as usize);
            let read = catch_panic(|| entry.read_to_end(&mut data)).unwrap_or_else(|m| Err(std::io::Error::other(m)));
            let broken = match read {
                Err(e) => Some(format!("member {path} ({size} bytes) breaks off: {e}")),
                Ok(_) if data.len() as u64 != size => {
                    Some(format!("member {path} breaks off after {} of its {size} bytes", data.len()))
                }
                Ok(_) => None,
            };
            if let Some(e) = broken {
                flush(ctx, file, &text_ext, &mut index, &mut current, f)?;
                return f(Err(rec_err(file, index, offset, Reason::Io, e)));
            }
        }
        next_offset = entry.raw_file_position() + size.div_ceil(512) * 512;
        if current.as_ref().is_some_and(|s| s.key != key) {
            flush(ctx, file, &text_ext, &mut index, &mut current, f)?;
        }
        let sample = current.get_or_insert_with(|| Sample { key: key.to_string(), offset, members: Vec::new() });
        sample.members.push(Member { ext, path, data });
    }
    if current.is_none() && index == 0 {
        return f(Err(rec_err(file, 0, 0, Reason::Empty, "a tar without members")));
    }
    flush(ctx, file, &text_ext, &mut index, &mut current, f)
}

/// The caption / transcript / document member's extension for this source.
fn text_extension(ctx: &ReadCtx<'_>) -> String {
    ctx.spec.text_field.as_deref().unwrap_or(DEFAULT_TEXT_EXTENSION).to_ascii_lowercase()
}

/// Whether a member with extension `ext` is this source's media: the one `image_field`
/// (`audio_field`) names, else any image (audio) format.
fn is_media(ctx: &ReadCtx<'_>, ext: &str) -> bool {
    let (explicit, formats) = match ctx.spec.kind {
        SourceKind::Image => (ctx.spec.image_field.as_deref(), IMAGE_EXTENSIONS),
        SourceKind::Speech => (ctx.spec.audio_field.as_deref(), AUDIO_EXTENSIONS),
        SourceKind::Text | SourceKind::Interleaved => return false,
    };
    match explicit {
        Some(e) => ext.eq_ignore_ascii_case(e),
        None => formats.contains(&ext.rsplit('.').next().unwrap_or_default()),
    }
}

/// Hands the sample being gathered (if any) on as record `index`, which then counts.
fn flush(
    ctx: &ReadCtx<'_>,
    file: &Arc<Path>,
    text_ext: &str,
    index: &mut u64,
    current: &mut Option<Sample>,
    f: &mut dyn FnMut(Item) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let Some(s) = current.take() else { return ControlFlow::Continue(()) };
    let item = record(ctx, file, text_ext, *index, s);
    *index += 1;
    f(item)
}

/// One sample as a record, or the error that makes it unusable.
fn record(ctx: &ReadCtx<'_>, file: &Arc<Path>, text_ext: &str, index: u64, mut sample: Sample) -> Item {
    let spec = ctx.spec;
    let err = |reason: Reason, e: String| rec_err(file, index, sample.offset, reason, e);
    let text = match sample.members.iter().position(|m| m.ext == text_ext) {
        None => None,
        Some(i) => {
            let m = sample.members.swap_remove(i);
            match String::from_utf8(m.data) {
                Ok(s) => Some(s.trim().to_string()),
                Err(e) => {
                    let at = e.utf8_error().valid_up_to();
                    return Err(err(Reason::InvalidUtf8, format!("{}: invalid UTF-8 at byte {at}", m.path)));
                }
            }
        }
    };
    let (explicit, what) = match spec.kind {
        SourceKind::Text => {
            return match text.filter(|t| !t.is_empty()) {
                Some(t) => Ok(RawRecord {
                    file: file.clone(),
                    index,
                    byte_offset: Some(sample.offset),
                    parts: vec![RawPart::Text(t)],
                }),
                None => Err(err(Reason::Empty, format!("sample {}: no .{text_ext} member with text", sample.key))),
            };
        }
        SourceKind::Image => (spec.image_field.as_deref(), "image"),
        SourceKind::Speech => (spec.audio_field.as_deref(), "audio"),
        // Refused once per file in `read_webdataset`; never reached.
        SourceKind::Interleaved => return Err(err(Reason::WrongType, "not for interleaved sources".into())),
    };
    let Some(i) = sample.members.iter().position(|m| is_media(ctx, &m.ext)) else {
        let want = explicit.map_or_else(|| format!("{what} member"), |e| format!(".{e} member"));
        let have: Vec<&str> = sample.members.iter().map(|m| m.ext.as_str()).collect();
        return Err(err(Reason::MissingField, format!("sample {}: no {want} (has {have:?})", sample.key)));
    };
    let m = sample.members.swap_remove(i);
    let media = ctx.media(Blob::Bytes { data: m.data, name: m.path });
    Ok(RawRecord {
        file: file.clone(),
        index,
        byte_offset: Some(sample.offset),
        parts: ctx.pair(file, index, text, media),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::plan::{FileFormat, Unit};
    use crate::recipe::{RecipeOptions, SourceSpec};

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read(kind: SourceKind, bytes: &[u8], edit: impl FnOnce(&mut SourceSpec)) -> Vec<Item> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shard-000.tar");
        std::fs::write(&p, bytes).unwrap();
        let mut spec = SourceSpec::new(kind, vec![]);
        edit(&mut spec);
        let options = RecipeOptions::default();
        let ctx = ReadCtx { spec: &spec, options: &options };
        let unit =
            Unit { file: p, format: FileFormat::WebDataset, bytes: 0, row_groups: None, first_row: 0, remote: None };
        let mut out = Vec::new();
        let _ = crate::source::read_unit(&ctx, &unit, &mut |i| {
            out.push(i);
            ControlFlow::Continue(())
        });
        out
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("a/b.c/000123.seg.PNG"), ("a/b.c/000123", "seg.png".into()));
        assert_eq!(split_key("x.jpg"), ("x", "jpg".into()));
        assert_eq!(split_key("dir/noext"), ("dir/noext", String::new()));
    }

    #[test]
    fn samples_group_consecutive_members_and_pick_media_and_caption() {
        let tar = tar_of(&[
            ("s/000.jpg", b"JPG0"),
            ("s/000.txt", b" a cat \n"),
            ("s/000.json", b"{}"),
            ("s/001.png", b"PNG1"),
            ("s/002.txt", b"no image here"),
            ("s/003.seg.png", b"SEG3"),
            ("s/003.webp", b"WEBP3"),
        ]);
        let items = read(SourceKind::Image, &tar, |s| s.text_first = Some(1.0));
        assert_eq!(items.len(), 4);
        let r0 = items[0].as_ref().unwrap();
        assert_eq!((r0.index, r0.byte_offset), (0, Some(0)));
        assert_eq!(
            r0.parts,
            vec![
                RawPart::Text("a cat".into()),
                RawPart::Image(Blob::Bytes { data: b"JPG0".to_vec(), name: "s/000.jpg".into() })
            ]
        );
        let r1 = items[1].as_ref().unwrap();
        assert_eq!(r1.parts, vec![RawPart::Image(Blob::Bytes { data: b"PNG1".to_vec(), name: "s/001.png".into() })]);
        // Four members of 512-byte header + one 512-byte block before sample 1's header.
        assert_eq!(r1.byte_offset, Some(3 * 1024));
        let e = items[2].as_ref().unwrap_err();
        assert_eq!((e.reason, e.record), (Reason::MissingField, Some(2)));
        assert!(e.error.contains("s/002") && e.error.contains("image member"), "{}", e.error);
        // The first image-format member, unless image_field names one.
        let r3 = items[3].as_ref().unwrap();
        assert!(matches!(&r3.parts[0], RawPart::Image(Blob::Bytes { name, .. }) if name == "s/003.seg.png"));
        let items = read(SourceKind::Image, &tar, |s| s.image_field = Some("webp".into()));
        assert!(
            matches!(&items[3].as_ref().unwrap().parts[0], RawPart::Image(Blob::Bytes { name, .. }) if name == "s/003.webp")
        );
        assert!(items[0].is_err() && items[1].is_err());
    }

    #[test]
    fn text_and_speech_sources_and_a_caption_member_by_extension() {
        let tar = tar_of(&[("k1.flac", b"F"), ("k1.transcript.txt", b"hello"), ("k2.txt", b"\xff\xfe")]);
        let items = read(SourceKind::Speech, &tar, |s| s.text_field = Some("transcript.txt".into()));
        let r = items[0].as_ref().unwrap();
        assert!(r.parts.contains(&RawPart::Text("hello".into())));
        assert!(r.parts.iter().any(|p| matches!(p, RawPart::Audio(_))));
        let items = read(SourceKind::Text, &tar, |_| {});
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap_err().reason, Reason::Empty);
        let e = items[1].as_ref().unwrap_err();
        assert_eq!(e.reason, Reason::InvalidUtf8);
        assert!(e.error.contains("k2.txt"), "{}", e.error);
    }

    #[test]
    fn an_interleaved_source_refuses_a_tar_once() {
        let tar = tar_of(&[("a.jpg", b"A"), ("b.jpg", b"B"), ("c.jpg", b"C")]);
        let items = read(SourceKind::Interleaved, &tar, |_| {});
        assert_eq!(items.len(), 1);
        let e = items[0].as_ref().unwrap_err();
        assert_eq!((e.reason, e.record), (Reason::WrongType, None));
    }

    #[test]
    fn a_broken_tar_keeps_the_samples_before_the_break() {
        let tar = tar_of(&[("a.jpg", b"A"), ("a.txt", b"cap"), ("b.jpg", &[7u8; 2000]), ("c.jpg", b"C")]);
        // Cut inside b.jpg's data (its header at 2,048, its data from 2,560).
        let cut = &tar[..2 * 1024 + 512 + 1000];
        let items = read(SourceKind::Image, cut, |_| {});
        assert!(items[0].is_ok(), "{:?}", items[0]);
        let e = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(e.reason, Reason::Io);
        assert_eq!(e.byte_offset, Some(2 * 1024));
        assert!(e.error.contains("b.jpg"), "{}", e.error);
        // Cut inside a member that is skipped unread (`.json`): the break is found when the
        // reader steps past it, and reported at the end of the file.
        let tar2 = tar_of(&[("a.jpg", b"A"), ("a.json", &[b' '; 3000]), ("b.jpg", b"B")]);
        let items = read(SourceKind::Image, &tar2[..1024 + 512 + 100], |_| {});
        assert_eq!(items.len(), 2, "{items:?}");
        assert!(items[0].is_ok());
        let e = items[1].as_ref().unwrap_err();
        assert_eq!((e.reason, e.record, e.byte_offset), (Reason::Io, Some(1), Some(1024 + 512 + 100)));
        // A damaged header (checksum) past the first sample: one error where it starts.
        let mut bad = tar.clone();
        bad[2 * 1024 + 10] ^= 0x55;
        let items = read(SourceKind::Image, &bad, |_| {});
        assert!(items[0].is_ok());
        let e = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!((e.reason, e.byte_offset), (Reason::Io, Some(2 * 1024)));
        // Empty, and not a tar at all.
        assert_eq!(read(SourceKind::Image, b"", |_| {})[0].as_ref().unwrap_err().reason, Reason::Empty);
        let items = read(SourceKind::Image, b"definitely not a tar archive, just some text", |_| {});
        assert!(items.iter().all(Result::is_err) && !items.is_empty());
    }

    #[test]
    fn every_single_byte_change_of_a_header_is_a_read_or_an_error_never_a_panic() {
        // GNU and PAX (long names) headers, as Python's tarfile and GNU tar write them.
        let long = format!("{}/000001.png", "d".repeat(120));
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in [("000000.png", &b"P0"[..]), ("000000.txt", b"c0"), (long.as_str(), b"P1")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let clean = read(SourceKind::Image, &tar, |_| {});
        assert_eq!(clean.iter().filter(|i| i.is_ok()).count(), 2);
        let headers: Vec<usize> = (0..tar.len()).step_by(512).filter(|&o| tar[o + 257..o + 262] == *b"ustar").collect();
        assert!(headers.len() >= 4, "{headers:?}");
        let mut outcomes = [0usize; 2];
        for &h in &headers {
            for i in h..h + 512 {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut m = tar.clone();
                    m[i] ^= flip;
                    let items = read(SourceKind::Image, &m, |_| {});
                    outcomes[usize::from(items.iter().any(Result::is_err))] += 1;
                    // The tar crate itself returns errors here: the guard is not what saves it.
                    let panicked = items.iter().filter_map(|r| r.as_ref().err()).find(|e| e.error.contains("panicked"));
                    assert!(panicked.is_none(), "byte {i} ^ {flip:#x}: {panicked:?}");
                }
            }
        }
        // The checksum rejects most changes; the rest read as another name or size.
        assert!(outcomes[1] > outcomes[0], "{outcomes:?}");
    }
}

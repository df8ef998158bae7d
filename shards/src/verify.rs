//! Deep verification of a corpus (`motley shards verify`): recomputes every checksum, decodes
//! every record and compares every count with the footers and the manifest.

use crate::error::ShardError;
use crate::format::ModalityStats;
use crate::reader::{Corpus, Problem, ShardReader, VerifyReport, add_doc_stats};
use crate::writer::PerModality;

/// At most this many record-level problems are listed per shard (the rest are counted).
const MAX_PROBLEMS_PER_SHARD: usize = 32;

/// Releases a shard of a remote corpus when dropped (no-op for local corpora).
struct Release<'a>(&'a Corpus, usize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.release_path(self.1);
    }
}

pub(crate) fn verify_corpus(corpus: &Corpus) -> VerifyReport {
    let mut report = VerifyReport::default();
    let m = corpus.manifest();
    if let Err(e) = m.check(corpus.dir()) {
        report.problems.push(Problem::from_error(None, &e));
    }
    for (i, entry) in m.shards.iter().enumerate() {
        report.shards += 1;
        let first_doc = corpus.shard_start(i).unwrap_or(0);
        let name = entry.name.as_str();
        let push = |e: ShardError, report: &mut VerifyReport| report.problems.push(Problem::from_error(Some(name), &e));
        // A remote corpus's store fetches (and checks) the file first; it is let go after.
        let path = match corpus.shard_path(i) {
            Ok(p) => p,
            Err(e) => {
                push(e, &mut report);
                continue;
            }
        };
        let _release = Release(corpus, i);
        let reader = match ShardReader::open(&path) {
            Ok(r) => r,
            Err(e) => {
                push(e, &mut report);
                continue;
            }
        };
        report.bytes += reader.len_bytes();
        let actual = blake3::hash(reader.bytes()).to_hex().to_string();
        if actual != entry.blake3 {
            push(
                ShardError::Checksum {
                    path: path.clone(),
                    what: "shard blake3",
                    offset: 0,
                    expected: format!("blake3:{}", entry.blake3),
                    actual: format!("blake3:{actual}"),
                },
                &mut report,
            );
        }
        if let Err(e) = reader.check_against(entry, corpus.vocab()) {
            push(e, &mut report);
        }
        let mut shard_problems = 0usize;
        for c in 0..reader.num_chunks() {
            report.chunks += 1;
            if let Err(e) = reader.check_chunk(c) {
                shard_problems += 1;
                if shard_problems <= MAX_PROBLEMS_PER_SHARD {
                    push(e, &mut report);
                }
            }
        }
        let mut stats = [ModalityStats::default(); 3];
        let mut failed_docs = 0u64;
        for local in 0..reader.num_docs() {
            report.docs += 1;
            match reader.get(local) {
                Ok(doc) => add_doc_stats(&doc, &mut stats),
                Err(e) => {
                    failed_docs += 1;
                    shard_problems += 1;
                    if shard_problems <= MAX_PROBLEMS_PER_SHARD {
                        push(e.with_global(first_doc.saturating_add(local)), &mut report);
                    }
                }
            }
        }
        if shard_problems > MAX_PROBLEMS_PER_SHARD {
            push(
                ShardError::corrupt(
                    &path,
                    "shard",
                    0,
                    format!("{} more problems not listed", shard_problems - MAX_PROBLEMS_PER_SHARD),
                ),
                &mut report,
            );
        }
        if failed_docs == 0 && PerModality::from_array(stats) != reader.stats() {
            push(
                ShardError::ManifestMismatch {
                    path: path.clone(),
                    field: "footer modalities (recounted from records)",
                    manifest: format!("{:?}", reader.stats()),
                    actual: format!("{:?}", PerModality::from_array(stats)),
                },
                &mut report,
            );
        }
    }
    report
}

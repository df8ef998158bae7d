//! Shared body of the fuzz targets: parse a shard image and touch everything reachable.

use motley_shards::{SegmentView, ShardReader};

pub fn exercise(data: &[u8]) {
    let Ok(r) = ShardReader::from_bytes("fuzz.mshard", data) else { return };
    let _ = r.vocab();
    for c in 0..r.num_chunks().min(64) {
        let _ = r.chunk_entry(c);
        let _ = r.check_chunk(c);
    }
    for d in 0..r.num_docs().min(64) {
        let _ = r.index_entry(d);
        if let Ok(doc) = r.get(d) {
            let _ = doc.num_positions();
            for s in doc.segments() {
                let _ = (s.modality(), s.len(), s.meta());
                match s.data() {
                    SegmentView::Tokens(ids) => {
                        let v = ids.to_vec();
                        assert_eq!(v.len(), s.len());
                    }
                    SegmentView::Latent { dim, data } => assert_eq!(data.len(), s.len() * dim as usize),
                }
            }
            let _ = doc.to_owned();
        }
    }
}

//! A seeded pseudo-random permutation of `0..n` evaluated in O(1) memory and time per index
//! (a 4-round Feistel network with cycle walking), so shuffling 10M documents needs no
//! O(n) table at start-up and any position of the order can be resumed directly.

/// splitmix64 finalizer: a cheap, well-mixed 64-bit hash.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bijection of `0..n` keyed by a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Permutation {
        // Smallest even bit count whose domain covers n (at least 2 bits): domain < 4n, so the
        // cycle walk takes under 4 steps on average.
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let bits = bits + (bits & 1);
        let mut k = mix64(seed ^ 0x6D6F_746C_6579_5045);
        let mut keys = [0u64; 4];
        for key in &mut keys {
            k = mix64(k);
            *key = k;
        }
        Permutation { n, half_bits: bits / 2, keys }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn feistel(&self, x: u64) -> u64 {
        let h = self.half_bits;
        let mask = if h >= 64 { u64::MAX } else { (1u64 << h) - 1 };
        let (mut l, mut r) = (x >> h, x & mask);
        for k in self.keys {
            let f = mix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << h) | r
    }

    /// The element at position `i` of the shuffled order (`i < n`).
    pub fn get(&self, i: u64) -> u64 {
        if i >= self.n {
            return i;
        }
        let mut x = i;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_permutation() {
        for n in [0u64, 1, 2, 3, 5, 16, 17, 100, 1000, 4097] {
            let p = Permutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.get(i) as usize;
                assert!(!seen[j], "n={n}: {j} twice");
                seen[j] = true;
            }
        }
    }

    #[test]
    fn seeds_differ() {
        let a: Vec<u64> = (0..100).map(|i| Permutation::new(100, 1).get(i)).collect();
        let b: Vec<u64> = (0..100).map(|i| Permutation::new(100, 2).get(i)).collect();
        assert_ne!(a, b);
        let ident: Vec<u64> = (0..100).collect();
        assert_ne!(a, ident);
    }
}

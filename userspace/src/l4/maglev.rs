//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), computed in userspace.
//!
//! [`maglev_table`] is pure: the endpoints are sorted and deduplicated first, and each one's
//! permutation comes from a fixed hash of its `address:port` text, so two load-balancer nodes
//! with the same endpoints build byte-identical tables and send a flow to the same backend.
//! Each endpoint gets ⌊M/N⌋ or ⌈M/N⌉ of the M positions, and removing one endpoint moves few of
//! the positions the others own.

use std::net::SocketAddr;

/// Largest ring size accepted: `RINGS` holds slots × 2 × the ring size `u32`s.
pub const MAX_RING_SIZE: u32 = 1 << 24;

/// A Maglev table size: a prime, so that every skip visits every position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RingSize(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a Maglev ring size must be a prime between 3 and {MAX_RING_SIZE}, not {0}")]
pub struct RingSizeError(pub u64);

impl RingSize {
    pub const DEFAULT: RingSize = RingSize(xlb_common::DEFAULT_RING_SIZE);

    pub fn new(size: u64) -> Result<RingSize, RingSizeError> {
        let in_range = (3..=u64::from(MAX_RING_SIZE)).contains(&size);
        if in_range && is_prime(size) {
            Ok(RingSize(size as u32))
        } else {
            Err(RingSizeError(size))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for RingSize {
    fn default() -> Self {
        RingSize::DEFAULT
    }
}

fn is_prime(number: u64) -> bool {
    number >= 2
        && (2..)
            .take_while(|d| d * d <= number)
            .all(|d| !number.is_multiple_of(d))
}

/// The lookup table: position → the id of the endpoint that owns it.
///
/// `endpoints` pairs each endpoint with the id to write; order and duplicates do not matter.
/// Without endpoints the table is empty (the caller fills the ring with "no backend").
pub fn maglev_table<Id: Copy>(endpoints: &[(SocketAddr, Id)], ring_size: RingSize) -> Vec<Id> {
    let mut canonical: Vec<(SocketAddr, Id)> = endpoints.to_vec();
    canonical.sort_by_key(|(addr, _)| *addr);
    canonical.dedup_by_key(|(addr, _)| *addr);
    if canonical.is_empty() {
        return Vec::new();
    }
    let size = u64::from(ring_size.get());
    let permutations: Vec<Permutation> = canonical
        .iter()
        .map(|(addr, _)| Permutation::of(addr, size))
        .collect();

    let mut owners: Vec<Option<usize>> = vec![None; size as usize];
    let mut next_candidate = vec![0u64; canonical.len()];
    let mut filled = 0u64;
    // Endpoints take turns claiming their next free preferred position until none is left.
    loop {
        for (endpoint, permutation) in permutations.iter().enumerate() {
            let position = loop {
                let candidate = permutation.position(next_candidate[endpoint], size);
                next_candidate[endpoint] += 1;
                if owners[candidate].is_none() {
                    break candidate;
                }
            };
            owners[position] = Some(endpoint);
            filled += 1;
            if filled == size {
                return owners
                    .into_iter()
                    .map(|owner| canonical[owner.expect("every position is filled")].1)
                    .collect();
            }
        }
    }
}

/// An endpoint's preference order over the positions: `offset + j × skip (mod M)`.
struct Permutation {
    offset: u64,
    skip: u64,
}

impl Permutation {
    fn of(endpoint: &SocketAddr, size: u64) -> Permutation {
        let name = endpoint.to_string();
        Permutation {
            offset: stable_hash(name.as_bytes(), OFFSET_SEED) % size,
            skip: stable_hash(name.as_bytes(), SKIP_SEED) % (size - 1) + 1,
        }
    }

    fn position(&self, j: u64, size: u64) -> usize {
        ((self.offset + j % size * self.skip) % size) as usize
    }
}

const OFFSET_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const SKIP_SEED: u64 = 0x8422_2325_cbf2_9ce4;

/// FNV-1a with a seed, finished with MurmurHash3's 64-bit mixer. Fixed forever: the same
/// endpoint must get the same permutation on every node and every version of xlb.
fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = seed;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn endpoints(count: usize) -> Vec<(SocketAddr, u32)> {
        (0..count)
            .map(|i| {
                let addr = format!("10.{}.{}.{}:{}", i / 200, i % 200, 1 + i % 7, 30000 + i);
                (addr.parse().unwrap(), i as u32 + 1)
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut shares = HashMap::new();
        for id in table {
            *shares.entry(*id).or_default() += 1;
        }
        shares
    }

    #[test]
    fn ring_sizes_must_be_prime() {
        assert_eq!(RingSize::new(65537).unwrap().get(), 65537);
        assert_eq!(RingSize::new(13).unwrap().get(), 13);
        for bad in [0, 1, 2, 4, 65536, 65535, u64::from(MAX_RING_SIZE) + 43] {
            assert_eq!(RingSize::new(bad), Err(RingSizeError(bad)), "{bad}");
        }
        assert_eq!(RingSize::default().get(), 65537);
    }

    #[test]
    fn every_backend_gets_its_share_within_one_percent() {
        for count in 3..=100 {
            let table = maglev_table(&endpoints(count), RingSize::DEFAULT);
            assert_eq!(table.len(), 65537);
            let ideal = 65537.0 / count as f64;
            let shares = shares(&table);
            assert_eq!(shares.len(), count);
            for (id, share) in shares {
                let deviation = (share as f64 - ideal).abs() / ideal;
                assert!(
                    deviation <= 0.01,
                    "{count} backends: backend {id} has {share} positions, ideal {ideal:.1}"
                );
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_few_positions_of_the_others() {
        for count in 3..=100 {
            let all = endpoints(count);
            let before = maglev_table(&all, RingSize::DEFAULT);
            let removed_index = count / 2;
            let removed = all[removed_index].1;
            let mut rest = all.clone();
            rest.remove(removed_index);
            let after = maglev_table(&rest, RingSize::DEFAULT);
            let not_owned = before.iter().filter(|id| **id != removed).count();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(old, new)| **old != removed && old != new)
                .count();
            let fraction = moved as f64 / not_owned as f64;
            let bound = 1.2 / count as f64;
            assert!(
                fraction <= bound,
                "{count} backends: {moved} of {not_owned} positions moved ({fraction:.4} > {bound:.4})"
            );
        }
    }

    #[test]
    fn the_input_order_does_not_matter() {
        let forward = endpoints(17);
        let mut reversed = forward.clone();
        reversed.reverse();
        let mut shuffled = forward.clone();
        shuffled.rotate_left(5);
        shuffled.swap(1, 9);
        let mut duplicated = forward.clone();
        duplicated.extend_from_slice(&forward[..3]);
        let table = maglev_table(&forward, RingSize::DEFAULT);
        assert_eq!(maglev_table(&reversed, RingSize::DEFAULT), table);
        assert_eq!(maglev_table(&shuffled, RingSize::DEFAULT), table);
        assert_eq!(maglev_table(&duplicated, RingSize::DEFAULT), table);
    }

    #[test]
    fn the_table_is_a_fixed_function_of_the_endpoints() {
        let table = maglev_table(&endpoints(3), RingSize::new(13).unwrap());
        assert_eq!(table, [3, 3, 1, 1, 1, 1, 2, 2, 1, 2, 3, 3, 2]);
    }

    #[test]
    fn no_endpoints_no_table() {
        assert!(maglev_table::<u32>(&[], RingSize::DEFAULT).is_empty());
    }
}

//! The XDP program's port bitmaps (`xlb_common::port_bit`): `SERVICE_PORTS`, the (port,
//! protocol) pairs some L4 service listens on, whose packets are looked up in the connection
//! table; and `L7_PORTS`, the TCP ports of the L7 proxy, whose segments are passed at once.
//! An array lookup costs the program no call, where a hash map's costs several.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, MapData};
use xlb_common::port_bit;

use crate::dataplane_error::{map_error, DataplaneError};

/// A port and IP protocol number (TCP or UDP; others have no bit and are left out).
pub type PortProto = (u16, u8);

/// One bitmap of a loaded program, and the words written to it (all others are zero).
pub struct PortBitmap {
    name: &'static str,
    map: Array<MapData, u64>,
    written: BTreeMap<u32, u64>,
    /// The ports `written` holds.
    ports: BTreeSet<PortProto>,
}

impl PortBitmap {
    /// `name`: the map's, for errors.
    pub fn new(name: &'static str, map: Array<MapData, u64>) -> PortBitmap {
        PortBitmap {
            name,
            map,
            written: BTreeMap::new(),
            ports: BTreeSet::new(),
        }
    }

    /// Adds `ports` to what the bitmap holds.
    pub fn mark(&mut self, ports: &BTreeSet<PortProto>) -> Result<(), DataplaneError> {
        let mut marked = self.ports.clone();
        marked.extend(ports);
        self.write(&marked)
    }

    /// Makes the bitmap hold exactly `ports`, writing only the words that change.
    pub fn write(&mut self, ports: &BTreeSet<PortProto>) -> Result<(), DataplaneError> {
        let wanted = words(ports);
        let changed: BTreeSet<u32> = wanted
            .iter()
            .filter(|(index, bits)| self.written.get(index) != Some(bits))
            .map(|(index, _)| *index)
            .chain(
                self.written
                    .keys()
                    .filter(|index| !wanted.contains_key(index))
                    .copied(),
            )
            .collect();
        for index in changed {
            let bits = wanted.get(&index).copied().unwrap_or(0);
            self.map
                .set(index, bits, 0)
                .map_err(|source| map_error(self.name, "updated", source))?;
        }
        self.written = wanted;
        self.ports = ports.clone();
        Ok(())
    }
}

/// The non-zero words of the bitmap of `ports`.
fn words(ports: &BTreeSet<PortProto>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for &(port, proto) in ports {
        if let Some((index, bit)) = port_bit(port, proto) {
            *words.entry(index).or_insert(0) |= bit;
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use xlb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    #[test]
    fn tcp_and_udp_of_one_port_are_different_bits() {
        let ports = BTreeSet::from([
            (5432, IPPROTO_TCP),
            (5432, IPPROTO_UDP),
            (5433, IPPROTO_TCP),
            (5432, IPPROTO_ICMP),
        ]);
        let words = words(&ports);
        let tcp = port_bit(5432, IPPROTO_TCP).unwrap();
        let udp = port_bit(5432, IPPROTO_UDP).unwrap();
        assert_ne!(tcp.0, udp.0);
        assert_eq!(words.len(), 2);
        assert_eq!(words[&tcp.0], tcp.1 | (tcp.1 << 1));
        assert_eq!(words[&udp.0], udp.1);
    }

    #[test]
    fn the_last_port_is_the_last_bit() {
        assert_eq!(port_bit(0, IPPROTO_TCP), Some((0, 1)));
        assert_eq!(
            port_bit(65_535, IPPROTO_UDP),
            Some((xlb_common::PORT_BITMAP_WORDS - 1, 1 << 63))
        );
    }
}

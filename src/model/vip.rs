//! Virtual-service VIPs: each virtual service gets a stable address in 127.77.0.0/16 (DESIGN §2),
//! kept in the replicated state and freed when the service is deleted. Allocation walks a
//! cursor forward, so a freed address is reused only after the rest of the range, long after
//! any DNS cache (TTL seconds) could still hand it out for the old service.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::resource::ResourceKey;

/// First and last assignable address: 127.77.0.1 ..= 127.77.255.254.
const FIRST: u32 = u32::from_be_bytes([127, 77, 0, 1]);
const LAST: u32 = u32::from_be_bytes([127, 77, 255, 254]);

/// The VIPs in use and where the next search starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VipPool {
    /// The next address to try (0 means [`FIRST`]).
    cursor: u32,
    #[serde(skip)]
    used: BTreeMap<u32, ResourceKey>,
}

impl VipPool {
    /// Takes the first free address at or after the cursor, wrapping once; `None` when all
    /// 65,534 are taken.
    pub fn allocate(&mut self, key: &ResourceKey) -> Option<Ipv4Addr> {
        let start = if (FIRST..=LAST).contains(&self.cursor) {
            self.cursor
        } else {
            FIRST
        };
        let mut a = start;
        loop {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.used.entry(a) {
                slot.insert(key.clone());
                self.cursor = if a == LAST { FIRST } else { a + 1 };
                return Some(Ipv4Addr::from(a));
            }
            a = if a == LAST { FIRST } else { a + 1 };
            if a == start {
                return None;
            }
        }
    }

    pub fn release(&mut self, vip: Ipv4Addr) {
        self.used.remove(&u32::from(vip));
    }

    /// Marks an address as taken (rebuilding the pool from stored records).
    pub fn restore(&mut self, vip: Ipv4Addr, key: &ResourceKey) {
        self.used.insert(u32::from(vip), key.clone());
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourceKind;

    fn vs(n: u32) -> ResourceKey {
        ResourceKey::in_mesh(ResourceKind::VirtualService, "m", &format!("s{n}"))
    }

    #[test]
    fn addresses_advance_and_wrap_without_reuse_until_needed() {
        let mut p = VipPool::default();
        let a = p.allocate(&vs(1)).unwrap();
        let b = p.allocate(&vs(2)).unwrap();
        assert_eq!(
            (a, b),
            (Ipv4Addr::new(127, 77, 0, 1), Ipv4Addr::new(127, 77, 0, 2))
        );
        p.release(a);
        assert_eq!(
            p.allocate(&vs(3)).unwrap(),
            Ipv4Addr::new(127, 77, 0, 3),
            "a freed VIP waits"
        );
        let mut p = VipPool {
            cursor: LAST,
            ..Default::default()
        };
        assert_eq!(
            p.allocate(&vs(1)).unwrap(),
            Ipv4Addr::new(127, 77, 255, 254)
        );
        assert_eq!(
            p.allocate(&vs(2)).unwrap(),
            Ipv4Addr::new(127, 77, 0, 1),
            "wraps"
        );
    }

    #[test]
    fn a_full_range_says_so() {
        let mut p = VipPool::default();
        for n in 0..(LAST - FIRST + 1) {
            assert!(p.allocate(&vs(n)).is_some());
        }
        assert_eq!(p.allocate(&vs(u32::MAX)), None);
        p.release(Ipv4Addr::new(127, 77, 9, 9));
        assert_eq!(
            p.allocate(&vs(u32::MAX)),
            Some(Ipv4Addr::new(127, 77, 9, 9))
        );
    }
}

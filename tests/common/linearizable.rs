//! A linearizability checker for registers (Wing & Gong's search with Lowe's cache, as
//! porcupine and Knossos do it). Each key is checked on its own. A write whose outcome is
//! unknown (an error, a timeout) returns at "infinity": it may take effect at any point
//! after its call, or never. Written values must be unique: an unknown write whose value no
//! read saw is dropped (with it or without it, the same histories linearize), which keeps a
//! pile of concurrent unknown writes from making the search exponential.

use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Wrote this value.
    Write(String),
    /// Read this value (`None`: nothing written yet).
    Read(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub key: String,
    pub op: Op,
    /// Nanoseconds since the history began.
    pub call: u64,
    /// `None`: the outcome is unknown (writes only; failed reads are left out).
    pub ret: Option<u64>,
}

/// Checks every key; `Err` names the first key whose history is not linearizable.
pub fn check(history: &[Event]) -> Result<(), String> {
    let mut keys: Vec<&str> = history.iter().map(|e| e.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    let seen: HashSet<(&str, &str)> = history
        .iter()
        .filter_map(|e| match &e.op {
            Op::Read(Some(v)) => Some((e.key.as_str(), v.as_str())),
            _ => None,
        })
        .collect();
    for key in keys {
        let ops: Vec<&Event> = history
            .iter()
            .filter(|e| e.key == key)
            .filter(|e| match &e.op {
                Op::Write(v) => e.ret.is_some() || seen.contains(&(key, v.as_str())),
                Op::Read(_) => true,
            })
            .collect();
        if !check_register(&ops) {
            let mut lines: Vec<String> = ops
                .iter()
                .map(|e| format!("  {:>12} {:>12?} {:?}", e.call, e.ret, e.op))
                .collect();
            lines.sort();
            return Err(format!(
                "key {key}: no linearization of {} operations:\n{}",
                ops.len(),
                lines.join("\n")
            ));
        }
    }
    Ok(())
}

/// One entry of the time-ordered list: a call or a return of operation `op`.
#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return entry.
    matching: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

fn check_register(ops: &[&Event]) -> bool {
    // Times: calls and returns, returns at u64::MAX when unknown. At equal times a return
    // comes first (the operations did not overlap).
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, e) in ops.iter().enumerate() {
        events.push((e.call, true, i));
        events.push((e.ret.unwrap_or(u64::MAX), false, i));
    }
    events.sort_by_key(|(t, is_call, i)| (*t, *is_call, *i));
    let n = events.len();
    // Index 0 is a head sentinel; entries are 1..=n.
    let mut list: Vec<Entry> = Vec::with_capacity(n + 1);
    list.push(Entry {
        op: NIL,
        is_call: false,
        matching: NIL,
        prev: NIL,
        next: if n > 0 { 1 } else { NIL },
    });
    let mut ret_pos = vec![0usize; ops.len()];
    for (k, (_, is_call, op)) in events.iter().enumerate() {
        let pos = k + 1;
        if !is_call {
            ret_pos[*op] = pos;
        }
        list.push(Entry {
            op: *op,
            is_call: *is_call,
            matching: NIL,
            prev: pos - 1,
            next: if pos < n { pos + 1 } else { NIL },
        });
    }
    for e in list.iter_mut().skip(1) {
        if e.is_call {
            e.matching = ret_pos[e.op];
        }
    }
    let lift = |list: &mut Vec<Entry>, call: usize| {
        let ret = list[call].matching;
        for x in [call, ret] {
            let (p, nx) = (list[x].prev, list[x].next);
            list[p].next = nx;
            if nx != NIL {
                list[nx].prev = p;
            }
        }
    };
    let unlift = |list: &mut Vec<Entry>, call: usize| {
        let ret = list[call].matching;
        for x in [ret, call] {
            let (p, nx) = (list[x].prev, list[x].next);
            list[p].next = x;
            if nx != NIL {
                list[nx].prev = x;
            }
        }
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut state: Option<String> = None;
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut entry = list[0].next;
    loop {
        if list[0].next == NIL {
            return true;
        }
        if entry == NIL {
            // Only unknown writes' returns remain behind; cannot happen with a non-empty
            // list unless a return was reached, handled below.
            return false;
        }
        let e = list[entry];
        if e.is_call {
            let op = &ops[e.op].op;
            let next_state = match op {
                Op::Write(v) => Some(Some(v.clone())),
                Op::Read(r) => (*r == state).then(|| state.clone()),
            };
            let mut advanced = false;
            if let Some(next_state) = next_state {
                let mut bits = linearized.clone();
                bits[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((bits.clone(), next_state.clone())) {
                    stack.push((entry, state.clone()));
                    state = next_state;
                    linearized = bits;
                    lift(&mut list, entry);
                    entry = list[0].next;
                    advanced = true;
                }
            }
            if !advanced {
                entry = e.next;
            }
        } else {
            // An operation returned before anything could be linearized in its place:
            // undo the last choice.
            let Some((call, previous)) = stack.pop() else {
                return false;
            };
            state = previous;
            let op = list[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut list, call);
            entry = list[call].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(key: &str, v: &str, call: u64, ret: Option<u64>) -> Event {
        Event {
            key: key.into(),
            op: Op::Write(v.into()),
            call,
            ret,
        }
    }

    fn r(key: &str, v: Option<&str>, call: u64, ret: u64) -> Event {
        Event {
            key: key.into(),
            op: Op::Read(v.map(str::to_string)),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn accepts_linearizable_and_refuses_stale_and_invented_reads() {
        // Sequential: write a, read a.
        assert!(check(&[w("k", "a", 0, Some(10)), r("k", Some("a"), 20, 30)]).is_ok());
        // A read after an acknowledged write that still sees the old value: stale.
        assert!(check(&[w("k", "a", 0, Some(10)), r("k", None, 20, 30)]).is_err());
        // A read overlapping the write may see either.
        assert!(check(&[w("k", "a", 0, Some(50)), r("k", None, 20, 30)]).is_ok());
        assert!(check(&[w("k", "a", 0, Some(50)), r("k", Some("a"), 20, 30)]).is_ok());
        // A value nobody wrote.
        assert!(check(&[w("k", "a", 0, Some(10)), r("k", Some("b"), 20, 30)]).is_err());
        // Reads going back in time: a, then the older value.
        assert!(
            check(&[
                w("k", "a", 0, Some(10)),
                w("k", "b", 20, Some(100)),
                r("k", Some("b"), 30, 40),
                r("k", Some("a"), 50, 60),
            ])
            .is_err()
        );
        // An unknown write may take effect late, or never.
        assert!(
            check(&[
                w("k", "a", 0, Some(10)),
                w("k", "b", 20, None),
                r("k", Some("a"), 30, 40),
                r("k", Some("b"), 50, 60),
            ])
            .is_ok()
        );
        assert!(check(&[w("k", "b", 20, None), r("k", None, 30, 40)]).is_ok());
        // Unknown writes nobody saw cost nothing, however many overlap.
        let mut many: Vec<Event> = (0..200)
            .map(|i| w("k", &format!("u{i}"), i, None))
            .collect();
        many.push(w("k", "a", 0, Some(10)));
        many.push(r("k", Some("a"), 300, 310));
        assert!(check(&many).is_ok());
        many.push(r("k", Some("u7"), 320, 330));
        many.push(r("k", Some("a"), 340, 350));
        assert!(check(&many).is_err(), "u7 was seen, so a cannot come back");
        // Keys are independent.
        assert!(check(&[w("x", "a", 0, Some(10)), r("y", None, 20, 30)]).is_ok());
    }
}

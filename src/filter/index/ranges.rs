//! Range predicates of one column: which intervals hold a point. A centered interval tree
//! over index keys: a query costs O(log n + k) for `k` hits, and memory is O(n) whatever
//! the overlap. Intervals added since the tree was built wait in a list that queries scan,
//! and the first query that finds more than [`RECENT`] of them rebuilds the tree
//! (O(n log n)): subscribers join in batches between transactions, so a rebuild serves at
//! least that many joins, and a query never scans more than that many extra intervals.

use std::cmp::Ordering;

/// One side of an interval; keys are index keys (byte order is value order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bound {
    Unbounded,
    Incl(Box<[u8]>),
    Excl(Box<[u8]>),
}

impl Bound {
    fn key(&self) -> Option<&[u8]> {
        match self {
            Bound::Unbounded => None,
            Bound::Incl(k) | Bound::Excl(k) => Some(k),
        }
    }
}

/// `lower` admits `v`: `v` is at or above it.
pub(super) fn above(lower: &Bound, v: &[u8]) -> bool {
    match lower {
        Bound::Unbounded => true,
        Bound::Incl(k) => **k <= *v,
        Bound::Excl(k) => **k < *v,
    }
}

/// `upper` admits `v`: `v` is at or below it.
pub(super) fn below(upper: &Bound, v: &[u8]) -> bool {
    match upper {
        Bound::Unbounded => true,
        Bound::Incl(k) => *v <= **k,
        Bound::Excl(k) => *v < **k,
    }
}

/// The tighter of two lower bounds.
pub(super) fn max_lower(a: Bound, b: Bound) -> Bound {
    if cmp_lower(&a, &b) == Ordering::Less {
        b
    } else {
        a
    }
}

/// The tighter of two upper bounds.
pub(super) fn min_upper(a: Bound, b: Bound) -> Bound {
    if cmp_upper(&a, &b) == Ordering::Greater {
        b
    } else {
        a
    }
}

/// Lower bounds by where they start: `Excl(k)` starts just after `Incl(k)`.
fn cmp_lower(a: &Bound, b: &Bound) -> Ordering {
    match (a, b) {
        (Bound::Unbounded, Bound::Unbounded) => Ordering::Equal,
        (Bound::Unbounded, _) => Ordering::Less,
        (_, Bound::Unbounded) => Ordering::Greater,
        (x, y) => x.key().cmp(&y.key()).then_with(|| rank(x).cmp(&rank(y))),
    }
}

/// Upper bounds by where they end: `Excl(k)` ends just before `Incl(k)`.
fn cmp_upper(a: &Bound, b: &Bound) -> Ordering {
    match (a, b) {
        (Bound::Unbounded, Bound::Unbounded) => Ordering::Equal,
        (Bound::Unbounded, _) => Ordering::Greater,
        (_, Bound::Unbounded) => Ordering::Less,
        (x, y) => x.key().cmp(&y.key()).then_with(|| rank(y).cmp(&rank(x))),
    }
}

fn rank(b: &Bound) -> u8 {
    u8::from(matches!(b, Bound::Excl(_)))
}

/// No point lies in it (as far as byte strings go; a range empty only in the column's
/// domain, like `gt 5, lt 6` on integers, is kept and simply never hit).
fn is_empty(lower: &Bound, upper: &Bound) -> bool {
    match (lower.key(), upper.key()) {
        (Some(lo), Some(hi)) => lo > hi || (lo == hi && (rank(lower) | rank(upper)) != 0),
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub(super) struct Interval {
    pub(super) lower: Bound,
    pub(super) upper: Bound,
    pub(super) member: usize,
}

/// The intervals of one column: those in the tree, and those added since.
#[derive(Debug, Default)]
pub(super) struct Ranges {
    /// Everything the tree was built from.
    items: Vec<Interval>,
    tree: Option<Box<Node>>,
    recent: Vec<Interval>,
}

/// Intervals that may wait outside the tree.
const RECENT: usize = 32;

#[derive(Debug)]
struct Node {
    center: Box<[u8]>,
    items: Vec<Interval>,
    /// Positions in `items`, by ascending lower bound.
    by_lower: Vec<u32>,
    /// Positions in `items`, by descending upper bound.
    by_upper: Vec<u32>,
    left: Option<Box<Node>>,
    right: Option<Box<Node>>,
}

impl Ranges {
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty() && self.recent.is_empty()
    }

    pub(super) fn insert(&mut self, interval: Interval) {
        if is_empty(&interval.lower, &interval.upper) {
            return;
        }
        self.recent.push(interval);
    }

    /// Every member whose interval holds `v`.
    pub(super) fn stab(&mut self, v: &[u8], emit: &mut impl FnMut(usize)) {
        if self.recent.len() > RECENT {
            self.items.append(&mut self.recent);
            self.tree = build(self.items.clone());
        }
        for i in &self.recent {
            if above(&i.lower, v) && below(&i.upper, v) {
                emit(i.member);
            }
        }
        let mut node = self.tree.as_deref();
        while let Some(n) = node {
            node = n.stab(v, emit);
        }
    }
}

fn build(items: Vec<Interval>) -> Option<Box<Node>> {
    if items.is_empty() {
        return None;
    }
    let mut ends: Vec<&[u8]> = items
        .iter()
        .flat_map(|i| [i.lower.key(), i.upper.key()])
        .flatten()
        .collect();
    // Every interval has a finite bound (it comes from at least one comparison).
    ends.sort_unstable();
    let center: Box<[u8]> = ends.get(ends.len() / 2)?.to_vec().into();
    let n = items.len();
    let (mut left, mut right, mut here) = (Vec::new(), Vec::new(), Vec::new());
    for i in items {
        if !below(&i.upper, &center) {
            left.push(i);
        } else if !above(&i.lower, &center) {
            right.push(i);
        } else {
            here.push(i);
        }
    }
    // All on one side of the center (it is then the bound that excludes it): keep them
    // here, where every hit is checked against both bounds, rather than recurse forever.
    if left.len() == n || right.len() == n {
        here.append(&mut left);
        here.append(&mut right);
    }
    let mut by_lower: Vec<u32> = (0..here.len() as u32).collect();
    by_lower.sort_by(|&a, &b| cmp_lower(&here[a as usize].lower, &here[b as usize].lower));
    let mut by_upper: Vec<u32> = (0..here.len() as u32).collect();
    by_upper.sort_by(|&a, &b| cmp_upper(&here[b as usize].upper, &here[a as usize].upper));
    Some(Box::new(Node {
        center,
        items: here,
        by_lower,
        by_upper,
        left: build(left),
        right: build(right),
    }))
}

impl Node {
    /// Emits this node's hits and returns the child that may hold more.
    fn stab(&self, v: &[u8], emit: &mut impl FnMut(usize)) -> Option<&Node> {
        match v.cmp(&self.center) {
            Ordering::Less => {
                for &p in &self.by_lower {
                    let i = &self.items[p as usize];
                    if !above(&i.lower, v) {
                        break;
                    }
                    if below(&i.upper, v) {
                        emit(i.member);
                    }
                }
                self.left.as_deref()
            }
            Ordering::Greater => {
                for &p in &self.by_upper {
                    let i = &self.items[p as usize];
                    if !below(&i.upper, v) {
                        break;
                    }
                    if above(&i.lower, v) {
                        emit(i.member);
                    }
                }
                self.right.as_deref()
            }
            Ordering::Equal => {
                for i in self.items.iter().filter(|i| above(&i.lower, v)) {
                    if below(&i.upper, v) {
                        emit(i.member);
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bound(kind: u8, k: u8) -> Bound {
        match kind {
            0 => Bound::Unbounded,
            1 => Bound::Incl(Box::new([k])),
            _ => Bound::Excl(Box::new([k])),
        }
    }

    proptest! {
        #[test]
        fn stabbing_finds_exactly_the_intervals_holding_the_point(
            intervals in prop::collection::vec((0u8..3, 0u8..20, 1u8..3, 0u8..20), 0..60),
            points in prop::collection::vec(0u8..22, 1..10),
        ) {
            let mut ranges = Ranges::default();
            let mut all = Vec::new();
            for (member, (lk, lo, uk, hi)) in intervals.into_iter().enumerate() {
                // At least one finite bound, as every range predicate has.
                let i = Interval { lower: bound(lk, lo), upper: bound(uk, hi), member };
                all.push(i.clone());
                ranges.insert(i);
            }
            for p in points {
                let mut got = Vec::new();
                ranges.stab(&[p], &mut |m| got.push(m));
                got.sort_unstable();
                let want: Vec<usize> = all
                    .iter()
                    .filter(|i| above(&i.lower, &[p]) && below(&i.upper, &[p]))
                    .map(|i| i.member)
                    .collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}

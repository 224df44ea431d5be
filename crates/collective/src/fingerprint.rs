//! What a rank says it is calling, checked against every peer before any data moves.
//! A mismatch (a rank that skipped a call, a wrong length, a different root) becomes an
//! error on every rank instead of a hang or silently mixed buffers.

use crate::element::{Dtype, ReduceOp};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Which collective a call is.
pub enum OpKind {
    /// `barrier()`.
    Barrier,
    /// `all_reduce(op)`.
    AllReduce(ReduceOp),
    /// `reduce_scatter(op)`.
    ReduceScatter(ReduceOp),
    /// `all_gather()`.
    AllGather,
    /// `broadcast(root)`.
    Broadcast,
    /// `reduce(op, root)`.
    Reduce(ReduceOp),
    /// Collective allocation of a shared buffer.
    Alloc,
    /// `split(color, key)`.
    Split,
    /// `all_to_all(send, send_counts, recv, recv_counts)`.
    AllToAll,
}

impl OpKind {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Barrier => "barrier",
            OpKind::AllReduce(_) => "all_reduce",
            OpKind::ReduceScatter(_) => "reduce_scatter",
            OpKind::AllGather => "all_gather",
            OpKind::Broadcast => "broadcast",
            OpKind::Reduce(_) => "reduce",
            OpKind::Alloc => "alloc",
            OpKind::Split => "split",
            OpKind::AllToAll => "all_to_all",
        }
    }

    fn reduce_op(self) -> Option<ReduceOp> {
        match self {
            OpKind::AllReduce(op) | OpKind::ReduceScatter(op) | OpKind::Reduce(op) => Some(op),
            _ => None,
        }
    }

    fn has_root(self) -> bool {
        matches!(self, OpKind::Broadcast | OpKind::Reduce(_))
    }

    fn code(self) -> u64 {
        let base = match self {
            OpKind::Barrier => 0,
            OpKind::AllReduce(_) => 1,
            OpKind::ReduceScatter(_) => 2,
            OpKind::AllGather => 3,
            OpKind::Broadcast => 4,
            OpKind::Reduce(_) => 5,
            OpKind::Alloc => 6,
            OpKind::Split => 7,
            OpKind::AllToAll => 8,
        };
        base | self.reduce_op().map_or(0, |op| (op.code() + 1) << 8)
    }

    fn from_code(code: u64) -> Option<OpKind> {
        let op = match code >> 8 {
            0 => None,
            c => Some(ReduceOp::from_code(c - 1)?),
        };
        Some(match (code & 0xff, op) {
            (0, None) => OpKind::Barrier,
            (1, Some(op)) => OpKind::AllReduce(op),
            (2, Some(op)) => OpKind::ReduceScatter(op),
            (3, None) => OpKind::AllGather,
            (4, None) => OpKind::Broadcast,
            (5, Some(op)) => OpKind::Reduce(op),
            (6, None) => OpKind::Alloc,
            (7, None) => OpKind::Split,
            (8, None) => OpKind::AllToAll,
            _ => return None,
        })
    }
}

/// One collective call as a rank sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// The call's number on this communicator, from 1.
    pub seq: u64,
    /// Which collective.
    pub kind: OpKind,
    /// The element type (`None` for a barrier).
    pub dtype: Option<Dtype>,
    /// Elements in the buffer.
    pub count: u64,
    /// The root rank (broadcast, reduce), else 0.
    pub root: u64,
}

/// Words a fingerprint takes in shared memory.
pub(crate) const WORDS: usize = 5;

impl Fingerprint {
    pub(crate) fn to_words(self) -> [u64; WORDS] {
        [self.seq, self.kind.code(), self.dtype.map_or(0, |d| d.code() + 1), self.count, self.root]
    }

    /// Decodes what a peer wrote; garbage (a peer from another build) decodes to `None`.
    pub(crate) fn from_words(w: [u64; WORDS]) -> Option<Fingerprint> {
        let dtype = match w[2] {
            0 => None,
            c => Some(Dtype::from_code(c - 1)?),
        };
        Some(Fingerprint { seq: w[0], kind: OpKind::from_code(w[1])?, dtype, count: w[3], root: w[4] })
    }

    /// Whether two ranks are making the same call (the sequence number only labels it:
    /// equal calls with different numbers cannot happen without a kind mismatch first).
    pub(crate) fn agrees(&self, other: &Fingerprint) -> bool {
        self.seq == other.seq
            && self.kind == other.kind
            && self.dtype == other.dtype
            && self.count == other.count
            && self.root == other.root
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.kind.name())?;
        match self.dtype {
            Some(d) => write!(f, "{d}, {}", self.count)?,
            None if self.kind == OpKind::Barrier => {}
            None => write!(f, "{}", self.count)?,
        }
        if let Some(op) = self.kind.reduce_op() {
            write!(f, ", {op}")?;
        }
        if self.kind.has_root() {
            write!(f, ", root {}", self.root)?;
        }
        write!(f, ") as call #{}", self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_like_the_issue() {
        let fp = Fingerprint { seq: 57, kind: OpKind::AllGather, dtype: Some(Dtype::F32), count: 1024, root: 0 };
        assert_eq!(Fingerprint::from_words(fp.to_words()), Some(fp));
        assert_eq!(fp.to_string(), "all_gather(f32, 1024) as call #57");
        let fp = Fingerprint { seq: 3, kind: OpKind::Reduce(ReduceOp::Max), dtype: Some(Dtype::Bf16), count: 9, root: 2 };
        assert_eq!(Fingerprint::from_words(fp.to_words()), Some(fp));
        assert_eq!(fp.to_string(), "reduce(bf16, 9, max, root 2) as call #3");
        assert_eq!(Fingerprint::from_words([1, 99, 0, 0, 0]), None);
    }
}

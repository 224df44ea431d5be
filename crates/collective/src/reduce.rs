//! The reduction kernel: `dst = op(src_0, src_1, …)` over raw pointers, because in the
//! shared-memory algorithms `dst` is often one of the sources (a rank reduces its own
//! range in place) and the sources live in peers' memory.

use crate::element::{combine, finish, Element, ReduceOp};

/// Elements per block: the accumulator block stays in L1 and the inner loops vectorise.
const BLOCK: usize = 1024;

/// Reduces `srcs[0..n][0..len]` element-wise, in source order, into `dst[0..len]`.
/// `divisor` is the group size AVG divides by.
///
/// # Safety
/// Every pointer must be valid for `len` elements; no other thread may write the sources
/// or `dst` during the call. `dst` may equal a source pointer (the whole block is read
/// before it is written) but must not partially overlap one.
pub(crate) unsafe fn reduce_raw<T: Element>(dst: *mut T, srcs: &[*const T], len: usize, op: ReduceOp, divisor: usize) {
    // SAFETY: the same contract, passed on.
    unsafe { reduce_raw_observed(dst, srcs, len, op, divisor, &mut |_| {}) }
}

/// [`reduce_raw`] that hands each finished block of `dst` to `observe` while it is still
/// in cache (the distributed step measures the gradient norm this way, with no pass of
/// its own over memory).
///
/// # Safety
/// As [`reduce_raw`].
pub(crate) unsafe fn reduce_raw_observed<T: Element>(
    dst: *mut T,
    srcs: &[*const T],
    len: usize,
    op: ReduceOp,
    divisor: usize,
    observe: &mut dyn FnMut(&[T]),
) {
    let mut acc = [T::default().to_acc(); BLOCK];
    let mut start = 0;
    while start < len {
        let n = BLOCK.min(len - start);
        let acc = &mut acc[..n];
        {
            // SAFETY: every source is valid for len elements and start + n <= len.
            let first = unsafe { std::slice::from_raw_parts(srcs[0].add(start), n) };
            match srcs.get(1) {
                // The first two sources in one pass: the common two-rank case is then a
                // single read of each input and one write.
                Some(second) => {
                    // SAFETY: as for the first source.
                    let second = unsafe { std::slice::from_raw_parts(second.add(start), n) };
                    combine_into(acc, first, second, op);
                }
                None => {
                    for (a, x) in acc.iter_mut().zip(first) {
                        *a = x.to_acc();
                    }
                }
            }
            for src in srcs.iter().skip(2) {
                // SAFETY: as for the first source.
                let s = unsafe { std::slice::from_raw_parts(src.add(start), n) };
                accumulate(acc, s, op);
            }
        }
        // SAFETY: dst is valid for len elements and nobody else writes it; the block's
        // sources were read into `acc` above, so an aliasing source is no longer read.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(start), n) };
        if op == ReduceOp::Avg {
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = T::from_acc(finish(*a, op, divisor));
            }
        } else {
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = T::from_acc(*a);
            }
        }
        observe(out);
        start += n;
    }
}

/// `acc = op(a, b)`, with the operator hoisted out of the loop so each loop vectorises.
#[inline(always)]
fn combine_into<T: Element>(acc: &mut [T::Acc], a: &[T], b: &[T], op: ReduceOp) {
    macro_rules! pass {
        ($op:expr) => {
            for ((o, x), y) in acc.iter_mut().zip(a).zip(b) {
                *o = combine(x.to_acc(), y.to_acc(), $op);
            }
        };
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => pass!(ReduceOp::Sum),
        ReduceOp::Prod => pass!(ReduceOp::Prod),
        ReduceOp::Max => pass!(ReduceOp::Max),
        ReduceOp::Min => pass!(ReduceOp::Min),
    }
}

/// `acc = op(acc, s)`.
#[inline(always)]
fn accumulate<T: Element>(acc: &mut [T::Acc], s: &[T], op: ReduceOp) {
    macro_rules! pass {
        ($op:expr) => {
            for (o, x) in acc.iter_mut().zip(s) {
                *o = combine(*o, x.to_acc(), $op);
            }
        };
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => pass!(ReduceOp::Sum),
        ReduceOp::Prod => pass!(ReduceOp::Prod),
        ReduceOp::Max => pass!(ReduceOp::Max),
        ReduceOp::Min => pass!(ReduceOp::Min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::reference_reduce;
    use half::bf16;

    #[test]
    fn matches_reference_including_in_place() {
        let a: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        let mut b: Vec<f32> = (0..3000).map(|i| (i % 7) as f32 - 3.0).collect();
        for op in ReduceOp::ALL {
            let expect = reference_reduce(&[&a, &b], op);
            let mut out = b.clone();
            let srcs = [a.as_ptr(), out.as_ptr()];
            // SAFETY: both sources and out are live vectors of out.len() elements.
            unsafe { reduce_raw(out.as_mut_ptr(), &srcs, out.len(), op, 2) };
            assert_eq!(out, expect, "{op}");
        }
        b.clear();
    }

    #[test]
    fn bf16_accumulates_in_f32() {
        // 256 + 1 + 1 in bf16 steps would stay 256; in f32 it is 258, which rounds to 258.
        let parts = [vec![bf16::from_f32(256.0)], vec![bf16::from_f32(1.0)], vec![bf16::from_f32(1.0)]];
        let mut out = vec![bf16::ZERO];
        let srcs: Vec<*const bf16> = parts.iter().map(|p| p.as_ptr()).collect();
        // SAFETY: every source and out are live one-element buffers.
        unsafe { reduce_raw(out.as_mut_ptr(), &srcs, 1, ReduceOp::Sum, 3) };
        assert_eq!(out[0].to_f32(), 258.0);
    }
}

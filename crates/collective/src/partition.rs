//! How a buffer of `len` elements is split among `n` ranks: contiguous, balanced ranges
//! (the first `len % n` ranks get one element more), Megatron's layout. `reduce_scatter`
//! and `all_gather` use it, and so does the sharded optimizer, so a rank's shard of the
//! gradient is exactly the range of the parameters it updates.

use std::ops::Range;

/// The range of rank `rank` among `n` in a buffer of `len` elements.
pub fn shard_range(len: usize, n: usize, rank: usize) -> Range<usize> {
    let n = n.max(1);
    let (base, extra) = (len / n, len % n);
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

/// The part of `range` that lies inside `window`, possibly empty.
pub(crate) fn intersect(range: &Range<usize>, window: &Range<usize>) -> Range<usize> {
    let start = range.start.max(window.start);
    let end = range.end.min(window.end).max(start);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_buffer_and_differ_by_at_most_one() {
        for len in [0, 1, 5, 7, 8, 1000] {
            for n in 1..=8 {
                let ranges: Vec<_> = (0..n).map(|r| shard_range(len, n, r)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[n - 1].end, len);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }
}

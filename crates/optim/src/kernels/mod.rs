//! Fused update passes over flat buffers.
//!
//! Each update reads and writes every buffer exactly once, element by element, in the
//! operation order of torch's single-tensor code. Because no element depends on another,
//! the result is the same bits whatever the split: [`par_for_each`] cuts the buffers into
//! [`CHUNK`]-aligned pieces and hands them to rayon, so 1 and N threads agree exactly.

pub mod adafactor;
pub mod adam;
pub mod lion;
pub mod muon;
pub mod schedule_free;
pub mod sgd;

/// Elements per piece of work: five buffers of 128 KiB stay in a core's L2 cache.
pub const CHUNK: usize = 32 * 1024;

/// The buffers one update pass touches, all covering the same elements. `state` buffers an
/// algorithm does not use are empty.
pub struct Buffers<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub state: [&'a mut [f32]; 3],
}

impl<'a> Buffers<'a> {
    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    fn split_at(self, mid: usize) -> (Buffers<'a>, Buffers<'a>) {
        let (p0, p1) = self.params.split_at_mut(mid);
        let (g0, g1) = self.grads.split_at(mid);
        let [a, b, c] = self.state;
        let (a0, a1) = split_state(a, mid);
        let (b0, b1) = split_state(b, mid);
        let (c0, c1) = split_state(c, mid);
        (Buffers { params: p0, grads: g0, state: [a0, b0, c0] }, Buffers { params: p1, grads: g1, state: [a1, b1, c1] })
    }
}

fn split_state(s: &mut [f32], mid: usize) -> (&mut [f32], &mut [f32]) {
    if s.is_empty() {
        s.split_at_mut(0)
    } else {
        s.split_at_mut(mid)
    }
}

/// Runs `kernel` over `bufs` in pieces of at most [`CHUNK`] elements, in parallel on the
/// current rayon pool. Splitting is recursive (`rayon::join`), so it allocates nothing.
pub fn par_for_each<F>(bufs: Buffers<'_>, kernel: &F)
where
    F: Fn(Buffers<'_>) + Sync,
{
    let n = bufs.len();
    if n <= CHUNK {
        kernel(bufs);
        return;
    }
    let mid = (n / CHUNK).div_ceil(2) * CHUNK;
    let (left, right) = bufs.split_at(mid);
    rayon::join(|| par_for_each(left, kernel), || par_for_each(right, kernel));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_every_element_once() {
        let n = 5 * CHUNK + 17;
        let mut p = vec![0.0f32; n];
        let g: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut s = vec![1.0f32; n];
        let bufs = Buffers { params: &mut p, grads: &g, state: [&mut s, &mut [], &mut []] };
        par_for_each(bufs, &|b: Buffers<'_>| {
            assert!(b.len() <= CHUNK);
            for ((p, g), s) in b.params.iter_mut().zip(b.grads).zip(b.state[0].iter_mut()) {
                *p += g + *s;
                *s = 0.0;
            }
        });
        assert!(p.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
        assert!(s.iter().all(|&v| v == 0.0));
    }
}

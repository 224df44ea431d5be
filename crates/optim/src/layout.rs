//! Named parameters over one contiguous buffer.
//!
//! The layout is the only place that knows where a parameter lives. Parameters, gradients
//! and optimizer state are all `&[f32]` of [`Layout::numel`] elements (or a sub-range of
//! them), and a parameter's elements are `offset..offset + numel` in each.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};

/// One parameter: its name, its shape (row-major; `[]` is a scalar) and where it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// The parameter's name (unique in its layout).
    pub name: String,
    /// Its shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Where its elements start in the flat buffer.
    pub offset: usize,
}

impl ParamSpec {
    /// Its element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Its elements' range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Parameters laid end to end, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    params: Vec<ParamSpec>,
    numel: usize,
}

impl Layout {
    /// Lays out `(name, shape)` pairs end to end. Names must be unique and non-empty.
    pub fn new<I, S>(params: I) -> Result<Self>
    where
        I: IntoIterator<Item = (S, Vec<usize>)>,
        S: Into<String>,
    {
        let mut layout = Layout::default();
        for (name, shape) in params {
            layout.push(name.into(), shape)?;
        }
        Ok(layout)
    }

    /// Appends one parameter at the end of the buffer (torch's `add_param_group` grows the
    /// layout this way).
    pub fn push(&mut self, name: String, shape: Vec<usize>) -> Result<usize> {
        if name.is_empty() {
            return Err(OptimError::InvalidConfig("a parameter has an empty name".into()));
        }
        if self.index_of(&name).is_some() {
            return Err(OptimError::InvalidConfig(format!("parameter '{name}' appears twice")));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| OptimError::ShapeMismatch(format!("parameter '{name}': shape {shape:?} overflows")))?;
        let offset = self.numel;
        self.numel = offset.checked_add(numel).ok_or_else(|| OptimError::ShapeMismatch("the layout overflows usize".into()))?;
        self.params.push(ParamSpec { name, shape, offset });
        Ok(self.params.len() - 1)
    }

    /// Total number of elements of the flat buffer.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// How many parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The parameters, in buffer order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Parameter `index` (panics past the end, like slice indexing).
    pub fn param(&self, index: usize) -> &ParamSpec {
        &self.params[index]
    }

    /// The index of the parameter named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    /// Where `self` and `other` first differ, for an error message: the index and both
    /// parameters there (`"nothing"` past the end), and both lengths. `None` when equal.
    pub fn first_difference(&self, other: &Layout) -> Option<String> {
        if self == other {
            return None;
        }
        let describe = |l: &Layout, i: usize| l.params.get(i).map_or("nothing".to_string(), |p| format!("'{}' {:?}", p.name, p.shape));
        let i = (0..self.len().max(other.len())).find(|&i| self.params.get(i) != other.params.get(i)).unwrap_or(0);
        Some(format!(
            "parameter {i} is {} in one and {} in the other ({} vs {} parameters)",
            describe(self, i),
            describe(other, i),
            self.len(),
            other.len()
        ))
    }

    /// The parameters that overlap `range`, each with the overlapping element range
    /// (absolute offsets into the flat buffer). Zero-sized parameters inside the range are
    /// included with an empty overlap, so they still count as stepped.
    pub fn overlapping(&self, range: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        self.params.iter().enumerate().filter_map(move |(i, p)| {
            let r = p.range();
            if r.is_empty() {
                return range.contains(&r.start).then_some((i, r));
            }
            let (lo, hi) = (r.start.max(range.start), r.end.min(range.end));
            (lo < hi).then_some((i, lo..hi))
        })
    }

    /// Checks that a buffer covers exactly `range` of this layout.
    pub fn check_len(&self, what: &str, got: usize, range: &Range<usize>) -> Result<()> {
        if got != range.len() {
            return Err(OptimError::ShapeMismatch(format!(
                "{what} has {got} elements, expected {} (elements {}..{} of {})",
                range.len(),
                range.start,
                range.end,
                self.numel
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new([("w", vec![2, 3]), ("b", vec![3]), ("s", vec![]), ("e", vec![0]), ("z", vec![4])]).unwrap()
    }

    #[test]
    fn offsets_are_end_to_end() {
        let l = layout();
        assert_eq!(l.numel(), 14); // 6 + 3 + 1 + 0 + 4
        assert_eq!(l.param(1).range(), 6..9);
        assert_eq!(l.param(2).range(), 9..10);
        assert_eq!(l.param(4).range(), 10..14);
    }

    #[test]
    fn overlapping_ranges() {
        let l = layout();
        let got: Vec<_> = l.overlapping(4..10).collect();
        assert_eq!(got, vec![(0, 4..6), (1, 6..9), (2, 9..10)]);
        let got: Vec<_> = l.overlapping(10..14).collect();
        assert_eq!(got, vec![(3, 10..10), (4, 10..14)]);
        let all: Vec<_> = l.overlapping(0..14).map(|(i, _)| i).collect();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert_eq!(l.overlapping(0..0).count(), 0);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        assert!(Layout::new([("a", vec![1]), ("a", vec![2])]).is_err());
    }
}

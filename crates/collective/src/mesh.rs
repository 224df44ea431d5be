//! [`DeviceMesh`]: the ranks of a group arranged as a grid with named dimensions
//! (e.g. `dp × tp × cp`), row-major like torch's `init_device_mesh` (the last dimension
//! varies fastest). `group("tp")` is the group along one dimension; `group(["dp", "cp"])`
//! the group along several, flattened, as 3-D parallelism synchronises gradients over
//! dp×cp but not over tp.

use crate::comm::Communicator;
use crate::error::{CommError, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// An n-dimensional grid of the world's ranks (torch's `DeviceMesh`): named dimensions,
/// each giving the sub-group of ranks that differ only along it.
pub struct DeviceMesh {
    world: Communicator,
    names: Vec<String>,
    sizes: Vec<usize>,
    coords: Vec<usize>,
    /// Groups made so far, by the (sorted) dimension indices they span.
    groups: Mutex<HashMap<Vec<usize>, Communicator>>,
}

/// Dimension names: `"tp"`, `["dp", "cp"]` or `&["dp", "cp"][..]`.
pub trait MeshDims {
    /// The dimension names given.
    fn names(&self) -> Vec<&str>;
}

impl MeshDims for &str {
    fn names(&self) -> Vec<&str> {
        vec![self]
    }
}

impl<const N: usize> MeshDims for [&str; N] {
    fn names(&self) -> Vec<&str> {
        self.to_vec()
    }
}

impl MeshDims for &[&str] {
    fn names(&self) -> Vec<&str> {
        self.to_vec()
    }
}

impl DeviceMesh {
    /// Arranges `world` as a mesh of the given `(name, size)` dimensions, whose sizes
    /// must multiply to the group size.
    pub fn new(world: Communicator, dims: &[(&str, usize)]) -> Result<DeviceMesh> {
        let product: usize = dims.iter().map(|d| d.1).product();
        if dims.is_empty() || product != world.size() || dims.iter().any(|d| d.1 == 0) {
            let shape: Vec<String> = dims.iter().map(|(n, s)| format!("{n}={s}")).collect();
            return Err(CommError::invalid(
                "DeviceMesh::new",
                format!("mesh [{}] does not cover {} ranks", shape.join(", "), world.size()),
            ));
        }
        for (i, (name, _)) in dims.iter().enumerate() {
            if name.is_empty() || dims[..i].iter().any(|d| d.0 == *name) {
                return Err(CommError::invalid("DeviceMesh::new", format!("dimension name {name:?} is empty or repeated")));
            }
        }
        let sizes: Vec<usize> = dims.iter().map(|d| d.1).collect();
        let mut rest = world.rank();
        let mut coords = vec![0; sizes.len()];
        for (c, s) in coords.iter_mut().zip(&sizes).rev() {
            *c = rest % s;
            rest /= s;
        }
        Ok(DeviceMesh { world, names: dims.iter().map(|d| d.0.to_string()).collect(), sizes, coords, groups: Mutex::new(HashMap::new()) })
    }

    /// The whole group.
    pub fn world(&self) -> &Communicator {
        &self.world
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| CommError::invalid("DeviceMesh", format!("no dimension {name:?} (the mesh has {:?})", self.names)))
    }

    /// This rank's coordinate along `dim`.
    pub fn coordinate(&self, dim: &str) -> Result<usize> {
        Ok(self.coords[self.index(dim)?])
    }

    /// The size of `dim`.
    pub fn dim_size(&self, dim: &str) -> Result<usize> {
        Ok(self.sizes[self.index(dim)?])
    }

    /// The group of ranks that differ from this one only along `dims` (ranked row-major
    /// over them, in the mesh's order). Collective over the whole mesh the first time a
    /// set of dimensions is asked for: every rank must ask for new sets in the same order.
    pub fn group(&self, dims: impl MeshDims) -> Result<Communicator> {
        let mut span = dims.names().iter().map(|n| self.index(n)).collect::<Result<Vec<_>>>()?;
        span.sort_unstable();
        span.dedup();
        let mut groups = self.groups.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = groups.get(&span) {
            return Ok(g.clone());
        }
        // Color: the coordinates outside the span; key: those inside, both row-major.
        let (mut color, mut key) = (0usize, 0usize);
        for (d, (&c, &s)) in self.coords.iter().zip(&self.sizes).enumerate() {
            if span.contains(&d) {
                key = key * s + c;
            } else {
                color = color * s + c;
            }
        }
        let color = u32::try_from(color).map_err(|_| CommError::invalid("DeviceMesh::group", "mesh too large"))?;
        let group =
            self.world.split(Some(color), key as i64)?.ok_or_else(|| CommError::invalid("DeviceMesh::group", "split gave no group"))?;
        groups.insert(span, group.clone());
        Ok(group)
    }
}

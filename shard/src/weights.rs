//! Memory-mapped safetensors checkpoints.
//!
//! Each file is mapped once as a byte tensor (libtorch `from_file`, not shared, so nothing can
//! write back to disk) and every weight is a typed view into it: loading costs no copy and no
//! resident memory until a weight is first touched. The header is parsed by the `safetensors`
//! crate. Converting to the run dtype is the only copy, and only when the dtypes differ.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, ShardError};

struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    start: usize,
    len: usize,
}

pub struct Weights {
    files: Vec<Tensor>,
    entries: HashMap<String, Entry>,
    device: Device,
    kind: Kind,
}

fn kind_of(d: Dtype, name: &str) -> Result<Kind> {
    Ok(match d {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        other => {
            return Err(ShardError::Weights(format!(
                "tensor `{name}` has unsupported dtype {other:?}"
            )))
        }
    })
}

/// The `.safetensors` files of a checkpoint folder, in a stable order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| ShardError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ShardError::Weights(format!(
            "no .safetensors files in {}",
            dir.display()
        )));
    }
    Ok(files)
}

impl Weights {
    /// Maps every safetensors file in `dir`. Weights are returned in `kind` on `device`.
    pub fn open(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (index, path) in safetensors_files(dir)?.into_iter().enumerate() {
            let io = |source| ShardError::Io {
                path: path.display().to_string(),
                source,
            };
            let file = File::open(&path).map_err(io)?;
            // SAFETY: the map is read-only and only used to parse the header; the checkpoint is not
            // expected to change while the shard runs.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| ShardError::Weights(format!("{}: {e}", path.display())))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                entries.insert(
                    name.clone(),
                    Entry {
                        file: index,
                        kind: kind_of(info.dtype, &name)?,
                        shape: info.shape.iter().map(|&d| d as i64).collect(),
                        start: data_start + a,
                        len: b - a,
                    },
                );
            }
            let path_str = path
                .to_str()
                .ok_or_else(|| ShardError::Weights(format!("non-UTF-8 path {}", path.display())))?;
            let bytes = Tensor::f_from_file(
                path_str,
                false,
                Some(map.len() as i64),
                (Kind::Uint8, Device::Cpu),
            )?;
            files.push(bytes);
        }
        Ok(Self {
            files,
            entries,
            device,
            kind,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name` in the checkpoint's own dtype, as a zero-copy view when alignment allows.
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ShardError::Weights(format!("missing tensor `{name}`")))?;
        let bytes = self.files[e.file].narrow(0, e.start as i64, e.len as i64);
        // A view of another dtype needs an element-aligned offset; a packed file may not give one.
        let aligned = e.start % e.kind.elt_size_in_bytes() == 0;
        let bytes = if aligned { bytes } else { bytes.copy() };
        Ok(bytes.f_view_dtype(e.kind)?.f_reshape(&e.shape)?)
    }

    /// The tensor `name`, checked against `shape`, in the run dtype on the run device.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.raw(name)?;
        if t.size() != shape {
            return Err(ShardError::Weights(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.size()
            )));
        }
        Ok(t.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }
}

//! NCCL between the GPU ranks of one host.
//!
//! There is no maintained NCCL crate, and none is needed: the shard links `libtorch_cuda.so`,
//! which links the wheel's `libnccl.so.2`, so NCCL is already in the process and its C API is
//! found with `dlsym`. That is the same NCCL build PyTorch itself uses, with nothing to keep in
//! step. (cudarc's NCCL module would `dlopen("libnccl.so")`, a name the wheel does not ship, and
//! bring a second set of CUDA bindings beside libtorch's.)
//!
//! Rank 0 makes the group's unique id and writes it to a file next to the shard sockets (a
//! folder only this user may enter); the other ranks wait for the file, and the launcher
//! deletes it before every start of the group, so a stale id is never read. Collectives run on
//! the legacy default CUDA stream, the stream libtorch's own kernels use unless told otherwise,
//! so they are ordered after the kernels that produced their input and before those that read
//! their output, with no extra synchronisation.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{CommError, Communicator, Result};

const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([c_char; UNIQUE_ID_BYTES]);

type Comm = *mut c_void;
type Stream = *mut c_void;

// The C signatures of the entry points (nccl.h, NCCL 2.x; cuda_runtime_api.h).
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type AllReduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type AllGather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
type CommDestroy = unsafe extern "C" fn(Comm) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type SetDevice = unsafe extern "C" fn(c_int) -> c_int;

struct Api {
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    all_gather: AllGather,
    comm_destroy: CommDestroy,
    error_string: ErrorString,
    set_device: SetDevice,
}

/// The API, when NCCL and the CUDA runtime are loaded in this process.
fn api() -> Result<&'static Api> {
    use std::mem::transmute;
    type Symbol = *mut c_void;
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let find = |name: &CStr| {
            // SAFETY: dlsym on the global namespace only looks a symbol up.
            let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            if symbol.is_null() {
                Err(format!(
                    "{} is not loaded in this process (a libtorch without CUDA?)",
                    name.to_string_lossy()
                ))
            } else {
                Ok(symbol)
            }
        };
        // SAFETY: each symbol is NCCL's (or the CUDA runtime's) exported function of that name,
        // transmuted to its documented C signature.
        unsafe {
            Ok(Api {
                get_version: transmute::<Symbol, GetVersion>(find(c"ncclGetVersion")?),
                get_unique_id: transmute::<Symbol, GetUniqueId>(find(c"ncclGetUniqueId")?),
                comm_init_rank: transmute::<Symbol, CommInitRank>(find(c"ncclCommInitRank")?),
                all_reduce: transmute::<Symbol, AllReduce>(find(c"ncclAllReduce")?),
                all_gather: transmute::<Symbol, AllGather>(find(c"ncclAllGather")?),
                comm_destroy: transmute::<Symbol, CommDestroy>(find(c"ncclCommDestroy")?),
                error_string: transmute::<Symbol, ErrorString>(find(c"ncclGetErrorString")?),
                set_device: transmute::<Symbol, SetDevice>(find(c"cudaSetDevice")?),
            })
        }
    })
    .as_ref()
    .map_err(|e| CommError::Setup {
        path: "libnccl.so.2".into(),
        reason: e.clone(),
    })
}

fn check(api: &Api, op: &'static str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static, NUL-terminated string for any code.
    let message = unsafe { CStr::from_ptr((api.error_string)(code)) }
        .to_string_lossy()
        .into_owned();
    Err(CommError::Nccl { op, code, message })
}

/// The NCCL version in this process, as NCCL encodes it (2.28.9 is 22809).
pub fn version() -> Result<i32> {
    let api = api()?;
    let mut v: c_int = 0;
    // SAFETY: a valid out-pointer.
    check(api, "ncclGetVersion", unsafe { (api.get_version)(&mut v) })?;
    Ok(v)
}

/// A fresh group id (rank 0 makes it; it needs no GPU).
fn unique_id() -> Result<UniqueId> {
    let api = api()?;
    let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
    // SAFETY: a valid out-pointer to a 128-byte ncclUniqueId.
    check(api, "ncclGetUniqueId", unsafe {
        (api.get_unique_id)(&mut id)
    })?;
    Ok(id)
}

/// Where the group's id is published, next to the shard sockets of `uds_path`.
pub fn id_path(uds_path: &str) -> PathBuf {
    PathBuf::from(format!("{uds_path}-nccl-id"))
}

fn id_bytes(id: &UniqueId) -> Vec<u8> {
    id.0.iter().map(|&c| c as u8).collect()
}

/// Rank 0 publishes `id` at `path`; written to a temporary name and renamed, so a reader never
/// sees half of it.
fn publish(path: &Path, id: &UniqueId) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let setup = |reason: String| CommError::Setup {
        path: path.display().to_string(),
        reason,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| setup(e.to_string()))?;
    std::io::Write::write_all(&mut file, &id_bytes(id)).map_err(|e| setup(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| setup(e.to_string()))
}

/// The other ranks wait for rank 0's id.
fn wait_for_id(path: &Path, timeout: Duration) -> Result<UniqueId> {
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.len() == UNIQUE_ID_BYTES {
                let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
                for (d, s) in id.0.iter_mut().zip(&bytes) {
                    *d = *s as c_char;
                }
                return Ok(id);
            }
        }
        if start.elapsed() > timeout {
            return Err(CommError::Setup {
                path: path.display().to_string(),
                reason: format!(
                    "rank 0 did not publish the NCCL id within {} s",
                    timeout.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Exchanges the group id through `path`: made and published by rank 0, read by the others.
fn exchange_id(path: &Path, rank: usize, timeout: Duration) -> Result<UniqueId> {
    if rank == 0 {
        let id = unique_id()?;
        publish(path, &id)?;
        Ok(id)
    } else {
        wait_for_id(path, timeout)
    }
}

fn data_type(kind: Kind) -> Result<c_int> {
    Ok(match kind {
        Kind::Int8 => 0,
        Kind::Uint8 => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        other => return Err(CommError::Tensor(format!("NCCL has no {other:?}"))),
    })
}

/// One rank of an NCCL group, on the GPU of its rank.
pub struct NcclComm {
    comm: Comm,
    rank: usize,
    world_size: usize,
    device: Device,
}

// SAFETY: the communicator is used by one thread at a time (the model keeps it behind a
// mutex); NCCL allows a communicator to move between threads.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the group on `device` (which must be `Cuda(i)`); blocks until every rank has.
    pub fn new(
        id_path: &Path,
        rank: usize,
        world_size: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        let Device::Cuda(index) = device else {
            return Err(CommError::Tensor(format!(
                "NCCL needs a CUDA device, not {device:?}"
            )));
        };
        let api = api()?;
        // SAFETY: cudaSetDevice takes a device index; an invalid one is an error code.
        let code = unsafe { (api.set_device)(index as c_int) };
        if code != 0 {
            return Err(CommError::Setup {
                path: format!("cuda:{index}"),
                reason: format!("cudaSetDevice failed with CUDA error {code}"),
            });
        }
        let id = exchange_id(id_path, rank, timeout)?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and the group's id, passed by value as nccl.h declares.
        check(api, "ncclCommInitRank", unsafe {
            (api.comm_init_rank)(&mut comm, world_size as c_int, id, rank as c_int)
        })?;
        Ok(Self {
            comm,
            rank,
            world_size,
            device,
        })
    }

    /// `t` on this rank's GPU, contiguous. Small host tensors (the ranks agreeing on a number
    /// at warmup) are staged there; the result goes back to where the input was.
    fn operand(&self, t: &Tensor) -> Tensor {
        t.to_device(self.device).contiguous()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let out = self.operand(t).copy();
        let api = api()?;
        // SAFETY: `out` is a contiguous CUDA tensor of `numel` elements of that type, alive for
        // the call; in place (send == receive) is allowed. The stream is the legacy default.
        check(api, "ncclAllReduce", unsafe {
            (api.all_reduce)(
                out.data_ptr(),
                out.data_ptr(),
                out.numel(),
                data_type(out.kind())?,
                0, // ncclSum
                self.comm,
                std::ptr::null_mut(),
            )
        })?;
        Ok(out.to_device(t.device()))
    }

    fn all_gather(&mut self, t: &Tensor, dim: i64) -> Result<Tensor> {
        let input = self.operand(t);
        let mut shape = vec![self.world_size as i64];
        shape.extend(input.size());
        let gathered = Tensor::empty(shape.as_slice(), (input.kind(), self.device));
        let api = api()?;
        // SAFETY: `input` holds `numel` elements and `gathered` room for `world_size` times as
        // many, both contiguous on this rank's device and alive for the call.
        check(api, "ncclAllGather", unsafe {
            (api.all_gather)(
                input.data_ptr(),
                gathered.data_ptr(),
                input.numel(),
                data_type(input.kind())?,
                self.comm,
                std::ptr::null_mut(),
            )
        })?;
        Ok(Tensor::cat(&gathered.unbind(0), dim).to_device(t.device()))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: `comm` came from ncclCommInitRank and is destroyed once.
            unsafe { (api.comm_destroy)(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_id_travels_through_its_file() {
        let dir = std::env::temp_dir().join(format!("tessera-nccl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id");
        let id = UniqueId([7; UNIQUE_ID_BYTES]);
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || wait_for_id(&path, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(50));
        publish(&path, &id).unwrap();
        let read = reader.join().unwrap().unwrap();
        assert_eq!(id_bytes(&read), id_bytes(&id));
        let e = wait_for_id(&dir.join("missing"), Duration::from_millis(100));
        assert!(e.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! All-reduce and all-gather between CPU shard processes on one host, through one shared
//! memory segment (a file in /dev/shm, mapped by every rank).
//!
//! Layout: a header of per-rank counters, then one data slot per rank. A collective is one or
//! more rounds (a tensor larger than a slot goes through in chunks). In round `s`, a rank:
//! 1. waits until every rank has finished reading round `s - 1` (`depart >= s - 1`), so no
//!    one still reads the slot it is about to overwrite;
//! 2. copies its chunk into its own slot and publishes `arrive = s` (release);
//! 3. waits until every rank has arrived (`arrive >= s`, acquire), then reads all slots;
//! 4. publishes `depart = s`.
//!
//! Only a rank's own counters are ever written by it, so the protocol needs no locks and is
//! correct under any interleaving. Beside `arrive`, a rank publishes the tag of the step it is
//! in and the chunk's size; a peer with another tag or size is in another call (the group is
//! out of step), which fails the round on every rank instead of summing unrelated tensors.
//! Waiting spins briefly, then yields, and sleeps only after a few milliseconds. While it
//! waits, a rank checks that its peers' processes still exist (a dead peer gives `PeerDied` at
//! once) and gives up after the timeout (a stopped or hung peer gives `Timeout`). A failed
//! round leaves the communicator failing every later collective (`Broken`).
//!
//! Set-up: rank 0 creates the segment, writes the geometry and its pid, and sets the magic
//! number last. The other ranks map it once the magic is there and rank 0's pid is alive (a
//! leftover file of a crashed run has a dead pid). When every rank has attached, rank 0
//! removes the file; the mappings stay valid until the processes exit.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use tch::{Device, Kind, Tensor};

use super::{CommError, Communicator, Result};

const MAGIC: u64 = 0x7465_7373_6572_6131; // "tessera1"
pub const MAX_RANKS: usize = 64;
const LINE: usize = 64;
// Header: magic, world, capacity, attached (one line); pids; arrive and depart, a line each per
// rank. A rank's arrive line also holds its step tag and chunk size (`TAG`, `BYTES` past it).
const PIDS: usize = LINE;
const ARRIVE: usize = PIDS + MAX_RANKS * 8;
const DEPART: usize = ARRIVE + MAX_RANKS * LINE;
const HEADER: usize = (DEPART + MAX_RANKS * LINE).div_ceil(4096) * 4096;
const TAG: usize = 8;
const BYTES: usize = 16;

pub struct ShmComm {
    map: MmapMut,
    rank: usize,
    world: usize,
    capacity: usize,
    seq: u64,
    timeout: Duration,
    /// The step this rank's collectives belong to (`begin_step`).
    tag: u64,
    /// Why a round failed, once one has. The failed round was left half done (this rank
    /// arrived and never departed), so a later round would wait for this very rank: every
    /// later collective fails at once instead.
    failed: Option<String>,
}

fn kind_size(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Float => Some(4),
        Kind::Double | Kind::Int64 => Some(8),
        Kind::BFloat16 | Kind::Half => Some(2),
        Kind::Int => Some(4),
        _ => None,
    }
}

/// Whether process `pid` still runs. A killed process stays a zombie until its parent reaps
/// it, and `kill(pid, 0)` succeeds on zombies, so the state in /proc decides where there is one.
fn alive(pid: u64) -> bool {
    if pid == 0 {
        return true; // not attached yet
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.trim_start().chars().next());
        return !matches!(state, Some('Z' | 'X' | 'x'));
    }
    // SAFETY: kill with signal 0 only checks that the process exists; it sends nothing.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) == 0 };
    exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl ShmComm {
    /// Joins (rank > 0) or creates (rank 0) the segment at `path`, with `capacity` bytes per
    /// rank and round. Waits up to `timeout` for the others.
    pub fn new(
        path: &Path,
        rank: usize,
        world: usize,
        capacity: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let setup = |reason: String| CommError::Setup {
            path: path.display().to_string(),
            reason,
        };
        if world == 0 || world > MAX_RANKS || rank >= world {
            return Err(setup(format!(
                "rank {rank} of world size {world} (at most {MAX_RANKS})"
            )));
        }
        let capacity = capacity.max(LINE).div_ceil(LINE) * LINE;
        let len = HEADER + world * capacity;
        let deadline = Instant::now() + timeout;
        let map = if rank == 0 {
            let _ = std::fs::remove_file(path); // a leftover of a crashed run
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| setup(e.to_string()))?;
            file.set_len(len as u64).map_err(|e| setup(e.to_string()))?;
            // SAFETY: the file is ours and stays mapped for the lifetime of `map`; other
            // processes only touch it through the same protocol.
            unsafe { MmapMut::map_mut(&file) }.map_err(|e| setup(e.to_string()))?
        } else {
            loop {
                if let Some(map) = Self::try_attach(path, len, world, capacity) {
                    break map;
                }
                if Instant::now() > deadline {
                    return Err(setup(format!(
                        "rank 0 did not create it within {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let comm = Self {
            map,
            rank,
            world,
            capacity,
            seq: 0,
            timeout,
            tag: 0,
            failed: None,
        };
        let pid = u64::from(std::process::id());
        if rank > 0 {
            comm.word(PIDS + rank * 8).store(pid, Ordering::Relaxed);
            comm.word(24).fetch_add(1, Ordering::AcqRel);
            return Ok(comm);
        }
        comm.word(8).store(world as u64, Ordering::Relaxed);
        comm.word(16).store(capacity as u64, Ordering::Relaxed);
        comm.word(PIDS).store(pid, Ordering::Relaxed);
        comm.word(24).store(1, Ordering::Relaxed);
        comm.word(0).store(MAGIC, Ordering::Release);
        let comm = comm.wait_attached(path, deadline);
        // Everyone has it mapped (or set-up failed): the name is no longer needed.
        let _ = std::fs::remove_file(path);
        comm
    }

    fn try_attach(path: &Path, len: usize, world: usize, capacity: usize) -> Option<MmapMut> {
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        if file.metadata().ok()?.len() != len as u64 {
            return None;
        }
        // SAFETY: as in `new`; the segment has the expected size.
        let map = unsafe { MmapMut::map_mut(&file) }.ok()?;
        // SAFETY: offsets inside the header, 8-byte aligned in a page-aligned mapping.
        let word = |off: usize| unsafe { &*(map.as_ptr().add(off) as *const AtomicU64) };
        let ready = word(0).load(Ordering::Acquire) == MAGIC
            && word(8).load(Ordering::Relaxed) == world as u64
            && word(16).load(Ordering::Relaxed) == capacity as u64
            && alive(word(PIDS).load(Ordering::Relaxed));
        ready.then_some(map)
    }

    fn wait_attached(self, path: &Path, deadline: Instant) -> Result<Self> {
        while self.word(24).load(Ordering::Acquire) < self.world as u64 {
            if Instant::now() > deadline {
                return Err(CommError::Setup {
                    path: path.display().to_string(),
                    reason: format!(
                        "only {} of {} ranks attached in time",
                        self.word(24).load(Ordering::Relaxed),
                        self.world
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self)
    }

    /// How long a collective waits for a peer before failing with `Timeout` (default: the
    /// set-up timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the segment for a server lives: one per launcher socket path and port.
    pub fn segment_path(uds_path: &str, master_port: u16) -> PathBuf {
        let name: String = uds_path
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from(format!("/dev/shm/tessera-tp-{master_port}-{name}"))
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: every offset used is inside the header and 8-byte aligned; the mapping is
        // page-aligned and lives as long as `self`.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn slot(&self, rank: usize) -> *mut u8 {
        // SAFETY: rank < world, so the slot lies inside the mapping.
        unsafe { self.map.as_ptr().add(HEADER + rank * self.capacity) as *mut u8 }
    }

    fn wait_all(&self, base: usize, target: u64, op: &'static str) -> Result<()> {
        let start = Instant::now();
        let mut next_check = Duration::from_millis(100);
        loop {
            let behind = (0..self.world)
                .find(|&r| self.word(base + r * LINE).load(Ordering::Acquire) < target);
            let Some(rank) = behind else {
                return Ok(());
            };
            // Spin, then yield, and only sleep after a few milliseconds: a rank has a core of
            // its own, and an OS sleep costs far more than a collective (hundreds of µs here).
            let waited = start.elapsed();
            if waited < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else if waited < Duration::from_millis(5) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
            if waited >= next_check {
                next_check += Duration::from_millis(100);
                let pid = self.word(PIDS + rank * 8).load(Ordering::Relaxed);
                if !alive(pid) {
                    return Err(CommError::PeerDied {
                        rank,
                        pid,
                        op,
                        seq: self.seq,
                    });
                }
                if waited >= self.timeout {
                    return Err(CommError::Timeout {
                        rank,
                        op,
                        seq: self.seq,
                        timeout_s: self.timeout.as_secs_f64(),
                    });
                }
            }
        }
    }

    /// One round: publish `chunk`, then read every rank's slot (as a tensor of `chunk`'s shape).
    fn round<R>(
        &mut self,
        op: &'static str,
        chunk: &Tensor,
        read: impl FnOnce(Vec<Tensor>) -> R,
    ) -> Result<R> {
        if let Some(why) = &self.failed {
            return Err(CommError::Broken(why.clone()));
        }
        let result = self.publish_and_read(op, chunk, read);
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn publish_and_read<R>(
        &mut self,
        op: &'static str,
        chunk: &Tensor,
        read: impl FnOnce(Vec<Tensor>) -> R,
    ) -> Result<R> {
        self.seq += 1;
        let s = self.seq;
        self.wait_all(DEPART, s - 1, op)?;
        let shape = chunk.size();
        let kind = chunk.kind();
        let view = |r: usize| {
            // SAFETY: the slot holds at least `capacity` bytes, and callers never pass a chunk
            // larger than that; the view is dropped before this round's depart is published.
            unsafe { Tensor::from_blob(self.slot(r), &shape, &[], kind, Device::Cpu) }
        };
        view(self.rank).copy_(chunk);
        let bytes = (chunk.numel() * chunk.kind().elt_size_in_bytes()) as u64;
        let line = ARRIVE + self.rank * LINE;
        self.word(line + TAG).store(self.tag, Ordering::Relaxed);
        self.word(line + BYTES).store(bytes, Ordering::Relaxed);
        self.word(line).store(s, Ordering::Release);
        self.wait_all(ARRIVE, s, op)?;
        for r in 0..self.world {
            let (tag, size) = (
                self.word(ARRIVE + r * LINE + TAG).load(Ordering::Relaxed),
                self.word(ARRIVE + r * LINE + BYTES).load(Ordering::Relaxed),
            );
            if (tag, size) != (self.tag, bytes) {
                return Err(CommError::OutOfStep {
                    rank: r,
                    ours: format!("step {:#x}, {op} #{s} of {bytes} bytes", self.tag),
                    theirs: format!("step {tag:#x}, {size} bytes"),
                });
            }
        }
        let result = read((0..self.world).map(view).collect());
        self.word(DEPART + self.rank * LINE)
            .store(s, Ordering::Release);
        Ok(result)
    }

    /// `t` flattened and cut into chunks that fit a slot.
    fn chunks(&self, t: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        if t.device() != Device::Cpu {
            return Err(CommError::Tensor(
                "shared-memory collectives take CPU tensors".into(),
            ));
        }
        let size = kind_size(t.kind())
            .ok_or_else(|| CommError::Tensor(format!("dtype {:?}", t.kind())))?;
        let flat = t.contiguous().view([-1]);
        let per_chunk = (self.capacity / size) as i64;
        let chunks = flat.split(per_chunk, 0);
        Ok((flat, chunks))
    }
}

impl Communicator for ShmComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn begin_step(&mut self, tag: u64) {
        self.tag = tag;
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let (flat, chunks) = self.chunks(t)?;
        let kind = flat.kind();
        // Half-precision sums accumulate in f32, as a single rank's matmul would.
        let acc = match kind {
            Kind::BFloat16 | Kind::Half => Kind::Float,
            k => k,
        };
        let mut out = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            let sum = self.round("all-reduce", chunk, |slots| {
                // A fresh accumulator: `to_kind` to the same dtype would alias slot 0, which
                // the other ranks are still reading.
                let mut total = if kind == acc {
                    slots[0].copy()
                } else {
                    slots[0].to_kind(acc)
                };
                for s in &slots[1..] {
                    total += s.to_kind(acc);
                }
                total.to_kind(kind)
            })?;
            out.push(sum);
        }
        let joined = if out.len() == 1 {
            out.remove(0)
        } else {
            Tensor::cat(&out, 0)
        };
        Ok(joined.view(t.size().as_slice()))
    }

    fn all_gather(&mut self, t: &Tensor, dim: i64) -> Result<Tensor> {
        let (_, chunks) = self.chunks(t)?;
        let mut per_rank: Vec<Vec<Tensor>> = (0..self.world).map(|_| Vec::new()).collect();
        for chunk in &chunks {
            let copies = self.round("all-gather", chunk, |slots| {
                slots.iter().map(|s| s.copy()).collect::<Vec<_>>()
            })?;
            for (r, c) in copies.into_iter().enumerate() {
                per_rank[r].push(c);
            }
        }
        let shape = t.size();
        let parts: Vec<Tensor> = per_rank
            .iter()
            .map(|c| Tensor::cat(c, 0).view(shape.as_slice()))
            .collect();
        Ok(Tensor::cat(&parts, dim))
    }
}

//! NCCL engine through `cudarc` (cargo feature `cuda`).
//!
//! cudarc is built with dynamic loading: this compiles on machines without
//! CUDA and opens `libcuda.so` / `libnccl.so` at run time. A missing
//! library makes cudarc panic on first use, so [`NcclEngine`] checks for
//! both first and returns [`CollectiveError::LibraryMissing`]. (The
//! `nvidia-nccl-cu12` wheel ships only `libnccl.so.2`: put a `libnccl.so`
//! symlink on `LD_LIBRARY_PATH`.)
//!
//! # Rendezvous
//!
//! Rank 0 calls [`NcclEngine::unique_id`] and hands the 128 bytes to the
//! other ranks through the coordinator; every rank then calls
//! [`NcclEngine::new`] with them. Use a fresh id for every world.
//!
//! # Buffers
//!
//! The training path hands device pointers ([`NcclEngine::all_reduce_mean_device`]):
//! flatten the gradients into one device buffer, make sure the stream that
//! wrote it has finished, call, and read the buffer back when the call has
//! returned (the call waits for the NCCL kernel). The [`Collective`] trait's
//! host-slice methods stage through a device buffer (for tests and small
//! messages). `ncclAvg` computes the mean. NCCL's result is identical on
//! every rank and deterministic for a fixed topology and NCCL version
//! (`NCCL_ALGO`/`NCCL_PROTO` pinned), not across different ones.
//!
//! # Timeouts and abort
//!
//! Each call enqueues the NCCL operation and then polls a CUDA event,
//! `ncclCommGetAsyncError`, the abort flag and the deadline; on abort,
//! timeout or error it calls `ncclCommAbort`, after which the engine is
//! unusable. Communicator initialisation blocks inside NCCL until every
//! rank joins, so it runs on a helper thread that is abandoned when the
//! deadline passes.
#![allow(unsafe_code)] // raw NCCL calls on caller-provided device pointers

use std::ffi::{CStr, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use std::any::Any;

use burn::prelude::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr};
use cudarc::nccl::{result as nccl, sys};

use super::{Abort, AbortHandle, Collective, CollectiveError, Result};

/// Bytes of an NCCL unique id (the rendezvous token).
pub const UNIQUE_ID_BYTES: usize = 128;

const POLL_INTERVAL: Duration = Duration::from_micros(50);

#[derive(Debug, Default)]
struct Flag(AtomicBool);

impl Abort for Flag {
    fn abort(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn is_aborted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The raw communicator. NCCL communicators may be used from any one
/// thread at a time.
struct RawComm(sys::ncclComm_t);
// SAFETY: the handle is an opaque pointer owned by this engine; it is only
// used by the thread that holds `&mut NcclEngine` (or the init thread before
// it hands the handle over).
unsafe impl Send for RawComm {}

/// Checks that the CUDA driver and NCCL can be loaded.
pub fn libraries_present() -> Result<()> {
    // SAFETY: loads the libraries by name (running their initialisers) and
    // drops them; no symbol is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CollectiveError::LibraryMissing(
            "the CUDA driver library (libcuda.so) cannot be loaded".into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { sys::is_culib_present() } {
        return Err(CollectiveError::LibraryMissing(
            "NCCL (libnccl.so) cannot be loaded; with the nvidia-nccl-cu12 wheel, \
             symlink libnccl.so -> libnccl.so.2 on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

fn nccl_err(what: &str, e: nccl::NcclError) -> CollectiveError {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
    let text = unsafe {
        let p = sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::from("unknown error")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    CollectiveError::Backend(format!("nccl: {what}: {text} ({:?})", e.0))
}

fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> CollectiveError {
    CollectiveError::Backend(format!("cuda: {what}: {e}"))
}

/// Data-parallel collectives on one GPU per process through NCCL.
pub struct NcclEngine {
    rank: usize,
    world: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    comm: Option<RawComm>,
    aborted: Arc<Flag>,
    poisoned: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for NcclEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclEngine")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl NcclEngine {
    /// A fresh NCCL unique id: rank 0's rendezvous token.
    pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
        libraries_present()?;
        let id = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the world named by `unique_id` as `rank` of `world` on CUDA
    /// device `device`. Waits at most `timeout` for the other ranks; every
    /// later call fails when it makes no progress for `timeout`.
    pub fn new(
        device: usize,
        rank: usize,
        world: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<Self> {
        if world == 0 || rank >= world || world > i32::MAX as usize {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} of a world of {world}"
            )));
        }
        let id: [u8; UNIQUE_ID_BYTES] = unique_id.try_into().map_err(|_| {
            CollectiveError::BadToken(format!(
                "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}",
                unique_id.len()
            ))
        })?;
        libraries_present()?;
        let ctx = CudaContext::new(device).map_err(|e| cuda_err("open device", e))?;
        let stream = ctx.new_stream().map_err(|e| cuda_err("new stream", e))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };

        let (tx, rx) = mpsc::channel();
        let init_ctx = ctx.clone();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let res = init_ctx
                    .bind_to_thread()
                    .map_err(|e| cuda_err("bind context", e))
                    .and_then(|()| {
                        let mut comm = std::mem::MaybeUninit::uninit();
                        // SAFETY: `comm` is a valid out-pointer; NCCL writes
                        // the communicator on success.
                        unsafe {
                            nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
                                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
                            Ok(RawComm(comm.assume_init()))
                        }
                    });
                let _ = tx.send(res);
            })
            .map_err(|e| CollectiveError::Backend(format!("spawn nccl init thread: {e}")))?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(res) => res?,
            Err(_) => {
                return Err(CollectiveError::Rendezvous(format!(
                    "rank {rank}: NCCL communicator not formed within {:.1} s",
                    timeout.as_secs_f64()
                )));
            }
        };
        Ok(Self {
            rank,
            world,
            ctx,
            stream,
            comm: Some(comm),
            aborted: Arc::new(Flag::default()),
            poisoned: None,
            timeout,
        })
    }

    /// The stream NCCL runs on. Work that produces a buffer must be
    /// finished (or ordered before this stream) when a call starts.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn comm(&self) -> Result<sys::ncclComm_t> {
        if self.aborted.is_aborted() {
            return Err(CollectiveError::Aborted { rank: self.rank });
        }
        if let Some(first) = &self.poisoned {
            return Err(CollectiveError::Poisoned {
                rank: self.rank,
                first: first.clone(),
            });
        }
        self.comm
            .as_ref()
            .map(|c| c.0)
            .ok_or_else(|| CollectiveError::Poisoned {
                rank: self.rank,
                first: "communicator destroyed".into(),
            })
    }

    /// Aborts the communicator and remembers why.
    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        let e = if self.aborted.is_aborted() {
            CollectiveError::Aborted { rank: self.rank }
        } else {
            e
        };
        if let Some(c) = self.comm.take() {
            // SAFETY: `c` is a live communicator owned by this engine and no
            // other thread uses it.
            let _ = unsafe { nccl::comm_abort(c.0) };
        }
        if self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        e
    }

    /// Waits for the work enqueued on the stream, watching for abort,
    /// asynchronous NCCL errors and the deadline.
    fn wait(&mut self, op: &'static str) -> Result<()> {
        let event = match self.stream.record_event(None) {
            Ok(ev) => ev,
            Err(e) => return Err(self.fail(cuda_err("record event", e))),
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(cuda_err(op, e))),
            }
            if self.aborted.is_aborted() {
                return Err(self.fail(CollectiveError::Aborted { rank: self.rank }));
            }
            if let Some(c) = &self.comm {
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: live communicator, valid out-pointer.
                let r = unsafe { sys::ncclCommGetAsyncError(c.0, &mut state) };
                if let Err(e) = r.result().and_then(|_| state.result()) {
                    return Err(self.fail(nccl_err(op, e)));
                }
            }
            if Instant::now() > deadline {
                let e = CollectiveError::DeviceTimeout {
                    rank: self.rank,
                    op,
                    secs: self.timeout.as_secs_f64(),
                };
                return Err(self.fail(e));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// In-place mean over ranks of `len` `f32` at device address `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to at least `len` `f32` of device memory in this
    /// engine's CUDA context, not written by any other stream until this
    /// call returns, and all writes to it must be complete.
    pub unsafe fn all_reduce_mean_device(&mut self, ptr: u64, len: usize) -> Result<()> {
        let comm = self.comm()?;
        if self.world == 1 || len == 0 {
            return Ok(());
        }
        let op = "all_reduce_mean";
        if let Err(e) = self.ctx.bind_to_thread() {
            return Err(self.fail(cuda_err("bind context", e)));
        }
        // SAFETY: the caller guarantees the buffer; in place is allowed.
        let r = unsafe {
            nccl::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                len,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclAvg,
                comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        if let Err(e) = r {
            return Err(self.fail(nccl_err(op, e)));
        }
        self.wait(op)
    }

    /// In-place broadcast of `bytes` bytes at device address `ptr` from `root`.
    ///
    /// # Safety
    ///
    /// As for [`NcclEngine::all_reduce_mean_device`], for `bytes` bytes.
    pub unsafe fn broadcast_device(&mut self, ptr: u64, bytes: usize, root: usize) -> Result<()> {
        let comm = self.comm()?;
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is not a rank of a world of size {}",
                self.world
            )));
        }
        if self.world == 1 || bytes == 0 {
            return Ok(());
        }
        let op = "broadcast";
        if let Err(e) = self.ctx.bind_to_thread() {
            return Err(self.fail(cuda_err("bind context", e)));
        }
        // SAFETY: the caller guarantees the buffer; in place is allowed.
        let r = unsafe {
            nccl::broadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                root as i32,
                comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        if let Err(e) = r {
            return Err(self.fail(nccl_err(op, e)));
        }
        self.wait(op)
    }

    /// Copies a host slice to the device, runs `f` on its device address
    /// and copies the result back.
    fn staged<T, F>(&mut self, host: &mut [T], f: F) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy,
        F: FnOnce(&mut Self, u64) -> Result<()>,
    {
        self.comm()?;
        if host.is_empty() || self.world == 1 {
            return Ok(());
        }
        let dev = match self.stream.clone_htod(&*host) {
            Ok(d) => d,
            Err(e) => return Err(self.fail(cuda_err("copy to device", e))),
        };
        let ptr = {
            let (ptr, _sync) = dev.device_ptr(&self.stream);
            ptr
        };
        f(self, ptr)?;
        if let Err(e) = self.stream.memcpy_dtoh(&dev, host) {
            return Err(self.fail(cuda_err("copy to host", e)));
        }
        if let Err(e) = self.stream.synchronize() {
            return Err(self.fail(cuda_err("synchronize", e)));
        }
        Ok(())
    }
}

impl Collective for NcclEngine {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        let len = buf.len();
        // SAFETY: `staged` passes the address of a device copy of `buf`
        // that lives (on this engine's stream) until it returns.
        self.staged(buf, |e, ptr| unsafe { e.all_reduce_mean_device(ptr, len) })
    }

    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is not a rank of a world of size {}",
                self.world
            )));
        }
        let len = buf.len();
        // SAFETY: as above.
        self.staged(buf, |e, ptr| unsafe { e.broadcast_device(ptr, len, root) })
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0.0f32; 1];
        self.all_reduce_mean(&mut one)
    }

    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.aborted.clone())
    }

    fn as_nccl(&mut self) -> Option<&mut NcclEngine> {
        Some(self)
    }
}

/// Burn's CUDA backend without its fusion layer: the tensors that own
/// device buffers.
type CudaCube = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// In-place mean over ranks of a flat tensor on Burn's CUDA backend
/// ([`twinhead_model::CudaBackend`]): NCCL reads and writes the tensor's own device
/// buffer, nothing is copied to the host. Returns `Ok(false)`, touching
/// nothing, when `tensor` is not an `f32` tensor of that backend (the
/// caller then stages it through the host).
///
/// The tensor must own its buffer (a fresh result, such as the `cat` of
/// the gradients): every tensor sharing the buffer sees the reduced values.
pub fn all_reduce_mean_tensor<B: Backend>(
    engine: &mut NcclEngine,
    tensor: &Tensor<B, 1>,
) -> Result<bool> {
    // SAFETY: `on_device_buffer` hands over the address of the tensor's
    // `len` f32, complete and kept alive for the call.
    on_device_buffer(tensor, |ptr, len| unsafe {
        engine.all_reduce_mean_device(ptr, len)
    })
}

/// Rank `root`'s values of a flat tensor on Burn's CUDA backend, written in
/// place into the tensor's device buffer on every rank; as
/// [`all_reduce_mean_tensor`] otherwise.
pub fn broadcast_tensor<B: Backend>(
    engine: &mut NcclEngine,
    tensor: &Tensor<B, 1>,
    root: usize,
) -> Result<bool> {
    // SAFETY: as above, for `len` f32 = `4 len` bytes.
    on_device_buffer(tensor, |ptr, len| unsafe {
        engine.broadcast_device(ptr, len * std::mem::size_of::<f32>(), root)
    })
}

/// Calls `op(device address, f32 count)` on the device buffer of a flat
/// `f32` tensor of Burn's CUDA backend once every kernel writing it has
/// finished; `Ok(false)` without calling it for any other tensor.
fn on_device_buffer<B: Backend>(
    tensor: &Tensor<B, 1>,
    op: impl FnOnce(u64, usize) -> Result<()>,
) -> Result<bool> {
    let [len] = tensor.dims();
    // A second reference keeps the fusion tensor registered after it is
    // resolved, so `tensor` stays valid and names the buffer `op` wrote.
    let primitive: Box<dyn Any> = Box::new(tensor.clone().into_primitive().tensor());
    let Ok(fused) = primitive.downcast::<FloatTensor<twinhead_model::CudaBackend>>() else {
        return Ok(false);
    };
    if fused.dtype != DType::F32 {
        return Ok(false);
    }
    let client = fused.client.clone();
    // Runs what is queued for the tensor and hands over its buffer.
    let cube = client.resolve_tensor_float::<CudaCube>(*fused);
    if !cube.is_contiguous() {
        return Ok(false);
    }
    // The kernels that wrote it run on CubeCL's stream: wait for them.
    <CudaCube as Backend>::sync(&cube.device)
        .map_err(|e| CollectiveError::Backend(format!("cuda: sync before a collective: {e:?}")))?;
    let resource = cube
        .client
        .get_resource(cube.handle.clone())
        .map_err(|e| CollectiveError::Backend(format!("cuda: tensor buffer: {e:?}")))?;
    // `ptr` addresses the tensor's `len` f32 in the primary CUDA context
    // that CubeCL and the engine share; `resource` keeps the allocation
    // alive, and no Burn work is queued until `op` has returned (the
    // engine waits for NCCL to finish).
    op(resource.resource().ptr, len)?;
    drop(resource);
    Ok(true)
}

impl Drop for NcclEngine {
    fn drop(&mut self) {
        if let Some(c) = self.comm.take() {
            // SAFETY: live communicator owned by this engine. Abort (rather
            // than finalize) never waits for peers.
            let _ = unsafe { nccl::comm_abort(c.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without CUDA (as on the build machines) everything fails with an
    /// error, never a panic.
    #[test]
    fn missing_libraries_are_an_error() {
        if libraries_present().is_ok() {
            return; // a CUDA machine: nothing to check here
        }
        assert!(matches!(
            NcclEngine::unique_id(),
            Err(CollectiveError::LibraryMissing(_))
        ));
        assert!(matches!(
            NcclEngine::new(0, 0, 1, &[0u8; UNIQUE_ID_BYTES], Duration::from_secs(1)),
            Err(CollectiveError::LibraryMissing(_))
        ));
        assert!(matches!(
            NcclEngine::new(0, 0, 1, &[0u8; 3], Duration::from_secs(1)),
            Err(CollectiveError::BadToken(_))
        ));
    }
}

//! Which device a worker trains on: `cpu` or `cuda:N`.

/// A worker's device, parsed from `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu` or `cuda:N`; a CUDA device in a build without the
    /// `cuda` feature is an error that says how to get one.
    pub fn parse(text: &str) -> Result<Device, String> {
        let device = match text {
            "cpu" => Device::Cpu,
            _ => {
                let ordinal = text
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        format!("--device {text:?}: expected \"cpu\" or \"cuda:N\" (e.g. cuda:0)")
                    })?;
                Device::Cuda(ordinal)
            }
        };
        if matches!(device, Device::Cuda(_)) && !cfg!(feature = "cuda") {
            return Err(format!(
                "--device {text}: this twinhead was built without CUDA; build it with `cargo build --release --features cuda`"
            ));
        }
        Ok(device)
    }
}

/// Checks, before any CUDA work, that this machine can run `cuda:ordinal`:
/// the driver, NVRTC (Burn's CUDA backend compiles its kernels with it) and
/// NCCL load, and the device exists. Without this, a missing library shows
/// up later as a panic inside the backend.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // loading libraries by name
pub fn check_cuda(ordinal: usize) -> Result<(), String> {
    crate::collective::nccl::libraries_present().map_err(|e| e.to_string())?;
    // SAFETY: loads the library by name (running its initialisers) and
    // drops it; no symbol is called.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "library not available: NVRTC (libnvrtc.so), which Burn's CUDA backend \
             compiles its kernels with, cannot be loaded; put the CUDA toolkit's lib64 (or \
             the nvidia-cuda-nvrtc wheel's lib) on LD_LIBRARY_PATH"
                .into(),
        );
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("cuda: counting devices: {e}"))?;
    if ordinal >= usize::try_from(count).unwrap_or(0) {
        return Err(format!(
            "--device cuda:{ordinal}: this machine has {count} CUDA device(s)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda_ordinals_and_names_bad_values() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        for bad in ["gpu", "cuda", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            let e = Device::parse(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
        let cuda = Device::parse("cuda:3");
        if cfg!(feature = "cuda") {
            assert_eq!(cuda, Ok(Device::Cuda(3)));
        } else {
            assert!(cuda.expect_err("no cuda").contains("--features cuda"));
        }
    }

    /// On a machine without CUDA (as the build machines) the check names
    /// the missing library instead of panicking.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_cuda_check_names_what_is_missing() {
        if crate::collective::nccl::libraries_present().is_ok() {
            return; // a CUDA machine: nothing to check here
        }
        let e = check_cuda(0).expect_err("no CUDA here");
        assert!(e.contains("library not available"), "{e}");
    }
}

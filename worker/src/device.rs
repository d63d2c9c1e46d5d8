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
}

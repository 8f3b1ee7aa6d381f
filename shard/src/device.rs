//! Which device a shard runs on, from the name `--device` takes (`auto`, `cpu`, `cuda`,
//! `cuda:N`). One parser for the binary, the tests and the benchmarks, so that each names
//! devices the same way and asking for CUDA where there is none fails the same way.

use tch::Device;

use crate::error::{Result, ShardError};

/// `None` and `auto` pick CUDA when libtorch sees a GPU, else the CPU.
pub fn parse_device(name: Option<&str>) -> Result<Device> {
    Ok(match name {
        None | Some("auto") => Device::cuda_if_available(),
        Some("cpu") => Device::Cpu,
        Some("cuda") if !tch::Cuda::is_available() => {
            return Err(ShardError::Device(
                "--device cuda: no CUDA device is available to libtorch".into(),
            ))
        }
        Some("cuda") => Device::Cuda(0),
        Some(other) => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => {
                return Err(ShardError::Device(format!(
                    "unknown device `{other}` (use cpu, cuda or cuda:N)"
                )))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_device(Some("cpu")).unwrap(), Device::Cpu);
        assert_eq!(parse_device(Some("cuda:3")).unwrap(), Device::Cuda(3));
        assert_eq!(
            parse_device(None).unwrap(),
            parse_device(Some("auto")).unwrap()
        );
        let e = parse_device(Some("gpu")).unwrap_err().to_string();
        assert!(e.contains("unknown device `gpu`"), "{e}");
        if !tch::Cuda::is_available() {
            let e = parse_device(Some("cuda")).unwrap_err().to_string();
            assert!(e.contains("no CUDA device"), "{e}");
        }
    }
}

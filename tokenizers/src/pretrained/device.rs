//! Where the pretrained encoders run: the CPU, or a CUDA GPU in builds with the `cuda` feature
//! (candle's CUDA backend). One choice per process, resolved when the first model loads.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::Device;

use crate::error::{Result, TokenizerError};

/// What a device choice may be, for the errors of both ways to give one.
const CHOICES: &str = "expected auto, cpu, cuda or cuda:N";

/// The device asked for: `auto` (the first GPU when this build has CUDA and the machine has
/// one, else the CPU), `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderDevice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for EncoderDevice {
    type Err = TokenizerError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(EncoderDevice::Auto),
            "cpu" => Ok(EncoderDevice::Cpu),
            "cuda" | "gpu" => Ok(EncoderDevice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(EncoderDevice::Cuda)
                .ok_or_else(|| TokenizerError::config("encoder device", format!("{s:?}: {CHOICES}"))),
        }
    }
}

impl fmt::Display for EncoderDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncoderDevice::Auto => f.write_str("auto"),
            EncoderDevice::Cpu => f.write_str("cpu"),
            EncoderDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this build can run the encoders on CUDA (the `cuda` cargo feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// Read when nothing was set: lets test binaries and library users pick the device too.
pub const ENV: &str = "MOTLEY_ENCODER_DEVICE";

/// The choice (`None`: not set, so [`ENV`], else `auto`), and the device it resolved to (a CUDA
/// device holds a context: made once).
static CHOICE: Mutex<(Option<EncoderDevice>, Option<Device>)> = Mutex::new((None, None));

/// Sets where models loaded from now on run; models already loaded stay where they are.
pub fn set_encoder_device(choice: EncoderDevice) {
    let mut c = CHOICE.lock().unwrap_or_else(|p| p.into_inner());
    if c.0 != Some(choice) {
        *c = (Some(choice), None);
    }
}

/// The device models load onto, resolving the choice on first use. `cuda` on a build or a
/// machine without it is an error; `auto` falls back to the CPU (with a warning when this build
/// has CUDA but no GPU answered).
pub fn encoder_device() -> Result<Device> {
    let mut c = CHOICE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = &c.1 {
        return Ok(d.clone());
    }
    let choice = match c.0 {
        Some(choice) => choice,
        None => match std::env::var(ENV) {
            Ok(v) => {
                v.parse().map_err(|_| TokenizerError::config("encoder device", format!("{ENV}={v:?}: {CHOICES}")))?
            }
            Err(_) => EncoderDevice::Auto,
        },
    };
    let d = resolve(choice)?;
    *c = (Some(choice), Some(d.clone()));
    Ok(d)
}

fn resolve(choice: EncoderDevice) -> Result<Device> {
    match choice {
        EncoderDevice::Cpu => Ok(Device::Cpu),
        EncoderDevice::Auto if !CUDA_BUILD => Ok(Device::Cpu),
        EncoderDevice::Auto => Device::new_cuda(0).or_else(|e| {
            tracing::warn!("no CUDA device for the encoders ({}); running them on the CPU", super::candle_message(&e));
            Ok(Device::Cpu)
        }),
        EncoderDevice::Cuda(_) if !CUDA_BUILD => Err(TokenizerError::config(
            "encoder device",
            format!(
                "{choice}: this motley was built without CUDA; build it with `--features cuda` \
                 (README, \"Encoding on a GPU\") or use --encoder-device cpu"
            ),
        )),
        EncoderDevice::Cuda(n) => Device::new_cuda(n)
            .map_err(|e| TokenizerError::config("encoder device", format!("{choice}: {}", super::candle_message(&e)))),
    }
}

/// Short name of a resolved device for reports: `cpu` or `cuda:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_choices() {
        for (s, d) in [
            ("auto", EncoderDevice::Auto),
            ("CPU", EncoderDevice::Cpu),
            ("cuda", EncoderDevice::Cuda(0)),
            ("cuda:3", EncoderDevice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<EncoderDevice>().ok(), Some(d), "{s}");
        }
        assert_eq!(EncoderDevice::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "cuda:", "cuda:x", "tpu"] {
            let e = bad.parse::<EncoderDevice>().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_build_resolves_auto_to_cpu_and_refuses_cuda() {
        if CUDA_BUILD {
            return;
        }
        assert!(matches!(resolve(EncoderDevice::Auto), Ok(Device::Cpu)));
        let e = resolve(EncoderDevice::Cuda(1)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("cuda:1: this motley was built without CUDA"), "{e}");
        assert!(e.contains("--features cuda"), "{e}");
    }
}

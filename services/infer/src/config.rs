//! The infer stage's settings: plain structs the CLI fills from its flags.

use std::path::PathBuf;

use panscreen_shared::worker::WorkerConfig;

pub use crate::model::Device;

/// Where and how the model runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub device: Device,
    /// ONNX Runtime's threads (CPU).
    pub threads: usize,
    pub tensorrt: TensorRtOptions,
}

impl Placement {
    pub fn cpu(threads: usize) -> Placement {
        Placement { device: Device::Cpu, threads, tensorrt: TensorRtOptions::default() }
    }

    /// Options that mean nothing on the chosen device are an error, not ignored.
    pub fn check(&self) -> Result<(), String> {
        let asks_tensorrt = self.tensorrt.fp16 || self.tensorrt.engine_cache.is_some();
        if asks_tensorrt && !matches!(self.device, Device::TensorRt { .. }) {
            return Err(format!(
                "the TensorRT options (fp16, engine cache) apply to --device tensorrt[:N], not {}",
                self.device
            ));
        }
        Ok(())
    }
}

/// TensorRT's own settings (`--device tensorrt:N`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorRtOptions {
    /// Build engines in half precision.
    pub fp16: bool,
    /// Keep built engines here and reuse them (an engine takes minutes to build).
    pub engine_cache: Option<PathBuf>,
}

/// What the stage needs besides its queue, store and model.
pub struct InferConfig {
    pub campaign: String,
    /// Studies per inference batch (studies from different messages run together).
    pub batch_size: usize,
    /// Keep each study's tensor in the work store after it is scored.
    pub keep_tensors: bool,
    pub worker: WorkerConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_options_on_another_device_are_refused() {
        let mut placement = Placement::cpu(2);
        assert_eq!(placement.check(), Ok(()));
        placement.tensorrt.fp16 = true;
        let error = placement.check().unwrap_err();
        assert!(error.contains("apply to --device tensorrt[:N], not cpu"), "{error}");
        placement.device = Device::Cuda { device_id: 0 };
        assert!(placement.check().is_err());
        placement.device = Device::TensorRt { device_id: 1 };
        placement.tensorrt.engine_cache = Some(PathBuf::from("/var/cache/panscreen/trt"));
        assert_eq!(placement.check(), Ok(()));
    }
}

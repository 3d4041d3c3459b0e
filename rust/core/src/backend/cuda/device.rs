//! Choosing and opening a GPU. Every way a GPU can be unusable (no driver, a driver too old, no
//! device, an architecture before Ampere, NVRTC or cuBLAS missing) is found here by probing the
//! libraries first, so the CPU path never reaches a cudarc call that would panic, and a user who
//! asked for "cuda" gets an error that says what to install or change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::compile;
use crate::error::{HoraeError, Result};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// What the user asked for: "auto" takes the first GPU if one works, else the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Exact(Device),
}

impl std::str::FromStr for DeviceRequest {
    type Err = HoraeError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || HoraeError::InvalidConfig(format!("device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{s}'"));
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Exact(Device::Cpu)),
            "cuda" | "gpu" => Ok(Self::Exact(Device::Cuda(0))),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                Ok(Self::Exact(Device::Cuda(n.parse().map_err(|_| bad())?)))
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The oldest driver API the kernels and cudarc's `cuda-12080` bindings need.
const MIN_DRIVER: i32 = 12000;
/// Ampere: bf16 conversions in PTX (`cvt.rn.bf16.f32`) and the tuning assumptions.
const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> HoraeError {
    HoraeError::Cuda(format!("{what}: {e:?}"))
}

/// Why no GPU can be used, or `Ok` with the number of devices. Never panics.
pub fn check_driver() -> Result<usize> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(HoraeError::Cuda(
            "no NVIDIA driver was found (libcuda.so.1 is not loadable): this machine has no usable GPU; \
             use device='cpu' (or 'auto')"
                .into(),
        ));
    }
    let mut version = 0;
    // SAFETY: a valid out-pointer; the library is present (checked above).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| cuda_err("cuDriverGetVersion", e))?;
    if version < MIN_DRIVER {
        return Err(HoraeError::Cuda(format!(
            "the NVIDIA driver supports CUDA {}.{}, horae needs 12.0 or newer: update the driver",
            version / 1000,
            version % 1000 / 10
        )));
    }
    cudarc::driver::result::init().map_err(|e| cuda_err("cuInit (is the GPU visible to this process?)", e))?;
    let n = CudaContext::device_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
    if n <= 0 {
        return Err(HoraeError::Cuda("the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES)".into()));
    }
    Ok(n as usize)
}

/// Whether GPU `ordinal` exists and is recent enough, without creating a context.
pub fn check_device(ordinal: usize) -> Result<()> {
    use cudarc::driver::{result::device, sys::CUdevice_attribute as A};
    let count = check_driver()?;
    if ordinal >= count {
        return Err(HoraeError::Cuda(format!("cuda:{ordinal} requested but the driver sees {count} GPU(s)")));
    }
    let dev = device::get(ordinal as i32).map_err(|e| cuda_err("cuDeviceGet", e))?;
    let name = device::get_name(dev).unwrap_or_else(|_| "the GPU".into());
    // SAFETY: `dev` is a valid device handle (just returned by the driver).
    let cc = unsafe {
        (
            device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        )
    };
    let (major, minor) =
        (cc.0.map_err(|e| cuda_err("compute capability", e))?, cc.1.map_err(|e| cuda_err("compute capability", e))?);
    if (major, minor) < MIN_COMPUTE_CAPABILITY {
        return Err(HoraeError::Cuda(format!(
            "{name} has compute capability {major}.{minor}; horae's kernels need 8.0 (Ampere) or newer"
        )));
    }
    Ok(())
}

/// Resolve a request to a device: `Auto` takes GPU 0 when the driver, the libraries and the GPU
/// itself are usable, else the CPU, with the reason.
pub fn resolve(req: DeviceRequest) -> (Device, Option<String>) {
    match req {
        DeviceRequest::Exact(d) => (d, None),
        DeviceRequest::Auto => match check_device(0).and_then(|_| check_libraries()) {
            Ok(()) => (Device::Cuda(0), None),
            Err(e) => (Device::Cpu, Some(e.to_string())),
        },
    }
}

fn check_libraries() -> Result<()> {
    if !compile::nvrtc_available() {
        compile::nvrtc_version()?; // its error names the package to install
    }
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(HoraeError::Cuda(
            "cuBLAS (libcublas.so.12) was not found: `pip install nvidia-cublas-cu12` or put the CUDA \
             toolkit's lib64 on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// An opened GPU: its context, the one stream every kernel and copy of the engine runs on, a
/// cuBLAS handle on that stream, and the compiled kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// Compute capability as a number: 80, 86, 89, 90, ...
    pub arch: u32,
    pub name: String,
    modules: Vec<Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Gpu {
    /// Open GPU `ordinal`, compile (or load from the disk cache) every kernel file.
    pub fn open(ordinal: usize) -> Result<Self> {
        check_device(ordinal)?;
        check_libraries()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("creating the CUDA context", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| cuda_err("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // One stream for the whole engine: cudarc's per-allocation events only matter across
        // streams, and each costs two event records per launch argument.
        // SAFETY: nothing else uses this context's buffers from another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("creating the cuBLAS handle", e))?;
        let arch = (major * 10 + minor) as u32;
        let cache = compile::cache_dir();
        let mut modules = Vec::new();
        for (file, _) in compile::KERNEL_FILES {
            let cubin = compile::cubin_cached(file, arch, cache.as_deref())?;
            modules.push(
                ctx.load_module(Ptx::from_binary(cubin))
                    .map_err(|e| cuda_err(&format!("loading kernels/{file}.cu"), e))?,
            );
        }
        Ok(Self { ctx, stream, blas, arch, name, modules, functions: Mutex::new(HashMap::new()) })
    }

    /// A kernel by its `extern "C"` name.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .modules
            .iter()
            .find_map(|m| m.load_function(name).ok())
            .ok_or_else(|| HoraeError::Cuda(format!("no kernel named {name}")))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Make this GPU's context current on the calling thread. Kernel launches and cudarc's copies
    /// do it themselves; raw cuBLAS and driver calls do not, and the engine's step loop runs on
    /// another thread than the one that opened the GPU.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| cuda_err("binding the CUDA context", e))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| cuda_err("cuMemGetInfo", e))
    }

    /// Wait for the stream; a kernel fault shows up here as an error.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("CUDA step failed", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse() {
        assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Exact(Device::Cpu));
        assert_eq!("cuda".parse::<DeviceRequest>().unwrap(), DeviceRequest::Exact(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::Exact(Device::Cuda(3)));
        for bad in ["", "cuda:", "cuda:x", "tpu"] {
            let e = bad.parse::<DeviceRequest>().unwrap_err().to_string();
            assert!(e.contains("'auto', 'cpu', 'cuda'"), "{e}");
        }
    }

    #[test]
    fn auto_never_panics_and_names_its_reason() {
        let (dev, why) = resolve(DeviceRequest::Auto);
        match dev {
            Device::Cpu => assert!(why.is_some_and(|w| !w.is_empty())),
            Device::Cuda(_) => assert!(why.is_none()),
        }
    }
}

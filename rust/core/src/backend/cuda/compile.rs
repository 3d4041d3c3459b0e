//! Kernel sources and their compilation with NVRTC. The `.cu` files in `kernels/` are compiled
//! into the crate as text; at run time NVRTC turns each into a CUBIN for the GPU's exact
//! architecture (a CUBIN, not PTX, so a newer NVRTC never produces PTX the driver refuses), once
//! per process and then from a disk cache keyed by source, options, NVRTC version and
//! architecture. `ptx` is what the CI check assembles with `ptxas` for sm_80 and sm_90.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::error::{HoraeError, Result};

const COMMON: &str = include_str!("../../../../../kernels/common.cuh");

/// Every kernel file: (name, source). One concept a file (see kernels/README.md).
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("paged_decode", include_str!("../../../../../kernels/paged_decode.cu")),
    ("prefill_attention", include_str!("../../../../../kernels/prefill_attention.cu")),
    ("cache_write", include_str!("../../../../../kernels/cache_write.cu")),
    ("rmsnorm", include_str!("../../../../../kernels/rmsnorm.cu")),
    ("rope", include_str!("../../../../../kernels/rope.cu")),
    ("activation", include_str!("../../../../../kernels/activation.cu")),
    ("embedding", include_str!("../../../../../kernels/embedding.cu")),
    ("sampling", include_str!("../../../../../kernels/sampling.cu")),
    ("bias", include_str!("../../../../../kernels/bias.cu")),
    ("init", include_str!("../../../../../kernels/init.cu")),
];

/// NVRTC options shared by every build. `-default-device` lets helpers omit `__device__`; no
/// fast-math flag: kernels call `__expf` where they want the fast path.
const OPTIONS: &[&str] = &["--std=c++17", "-default-device", "-lineinfo"];

/// The full text NVRTC compiles for `file`: `common.cuh` pasted where it is included (NVRTC gets
/// no include directory at run time) and `#line` so errors name the real file and line.
pub fn source(file: &str) -> Result<String> {
    let (_, text) = KERNEL_FILES
        .iter()
        .find(|(n, _)| *n == file)
        .ok_or_else(|| HoraeError::Cuda(format!("no kernel file '{file}'")))?;
    let mut out = String::with_capacity(COMMON.len() + text.len() + 64);
    out.push_str("#line 1 \"common.cuh\"\n");
    out.push_str(COMMON);
    for (i, line) in text.lines().enumerate() {
        if line.trim() == "#include \"common.cuh\"" {
            out.push_str(&format!("#line {} \"{file}.cu\"\n", i + 2));
        } else {
            if i == 0 {
                out.push_str(&format!("#line 1 \"{file}.cu\"\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Whether libnvrtc can be loaded (probing never panics, unlike a first call would).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version, e.g. (12, 9).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| HoraeError::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(HoraeError::Cuda(
            "NVRTC (libnvrtc.so.12) was not found: install it with `pip install nvidia-cuda-nvrtc-cu12` \
             (horae finds the pip package by itself) or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// What NVRTC produces: PTX text for a virtual architecture, or a CUBIN for a real one.
pub enum Output {
    Ptx(String),
    Cubin(Vec<u8>),
}

/// Compile one kernel file. `arch` is a compute capability such as 90; `cubin` picks
/// `--gpu-architecture=sm_90` and a CUBIN, else `compute_90` and PTX.
pub fn compile(file: &str, arch: u32, cubin: bool) -> Result<Output> {
    require_nvrtc()?;
    let src = CString::new(source(file)?).expect("kernel sources hold no NUL");
    let name = CString::new(format!("{file}.cu")).expect("no NUL");
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| HoraeError::Cuda(format!("nvrtcCreateProgram: {e:?}")))?;
    let target =
        if cubin { format!("--gpu-architecture=sm_{arch}") } else { format!("--gpu-architecture=compute_{arch}") };
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(target);
    // SAFETY: `prog` was just created and is destroyed once below, after its last use.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let res = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
                Err(HoraeError::Cuda(format!("NVRTC failed on kernels/{file}.cu for sm_{arch} ({e:?}):\n{log}")))
            }
            Ok(()) if cubin => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()).result().map(|_| Output::Cubin(buf))
                    })
                    .map_err(|e| HoraeError::Cuda(format!("nvrtcGetCUBIN: {e:?}")))
            }
            Ok(()) => result::get_ptx(prog)
                .map(|p| Output::Ptx(CStr::from_ptr(p.as_ptr()).to_string_lossy().into_owned()))
                .map_err(|e| HoraeError::Cuda(format!("nvrtcGetPTX: {e:?}"))),
        };
        let _ = result::destroy_program(prog);
        res
    };
    out
}

/// The disk-cache key of a compiled file: the project's block hasher (fixed keys, so the same
/// across runs; a new Rust release may change it, which only costs one recompile).
fn cache_key(src: &str, nvrtc: (i32, i32)) -> u64 {
    crate::kv::hash::chain_hash(None, &(src, OPTIONS, nvrtc))
}

/// Where compiled kernels are kept: `$HORAE_CACHE/kernels`, else `$XDG_CACHE_HOME/horae/kernels`,
/// else `~/.cache/horae/kernels` (the same root as the model cache).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HORAE_CACHE") {
        return Some(PathBuf::from(d).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("horae").join("kernels"))
}

/// A CUBIN for `file` on compute capability `arch`, from the disk cache when it holds one built
/// from the same source, options and NVRTC version; compiled (and stored) otherwise. A cache
/// that cannot be written only costs the next process a compile.
pub fn cubin_cached(file: &str, arch: u32, dir: Option<&Path>) -> Result<Vec<u8>> {
    let (major, minor) = nvrtc_version()?;
    let src = source(file)?;
    let key = cache_key(&src, (major, minor));
    let path = dir.map(|d| d.join(format!("{file}-sm{arch}-{key:016x}.cubin")));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let Output::Cubin(bytes) = compile(file, arch, true)? else { unreachable!("asked for a CUBIN") };
    if let Some(p) = path {
        // Write then rename, so a concurrent process never reads half a file.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(p.parent().expect("has a parent")).is_ok() && std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_paste_the_common_header_once() {
        for (file, _) in KERNEL_FILES {
            let s = source(file).unwrap();
            assert_eq!(s.matches("struct Bf16").count(), 1, "{file}");
            assert!(!s.lines().any(|l| l.trim() == "#include \"common.cuh\""), "{file}");
            assert!(s.contains("extern \"C\" __global__"), "{file}");
        }
        assert!(source("nope").is_err());
    }

    #[test]
    fn cache_key_changes_with_the_source() {
        assert_ne!(cache_key("a", (12, 9)), cache_key("b", (12, 9)));
        assert_ne!(cache_key("a", (12, 9)), cache_key("a", (12, 8)));
        assert_eq!(cache_key("x", (12, 9)), cache_key("x", (12, 9)));
    }
}

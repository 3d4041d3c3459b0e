//! The CPU's vector instruction sets that the kernels (`gemm`, `attention`, `prefill_attention`,
//! `quant`) are written for, detected at run time (`is_x86_feature_detected!`, so the wheel needs
//! no `-march=native`) and capped by `HORAE_CPU_KERNEL=portable|avx2|avx512` for comparisons (a
//! kernel the CPU lacks is never used).

/// The instruction sets the kernels are written for, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU has the features the kernel needs (std caches the detection).
    pub fn runs_here(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
        }
    }

    /// Every kernel this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.iter().copied().filter(|i| i.runs_here()).collect()
    }

    /// The best kernel this CPU runs, whatever `HORAE_CPU_KERNEL` says.
    pub fn best() -> Isa {
        *Isa::available().last().expect("portable is always available")
    }

    /// The best kernel this CPU runs, capped by `HORAE_CPU_KERNEL` where set. Decided once.
    pub fn detect() -> Self {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let all = Isa::available();
            let best = Isa::best();
            let cap = match std::env::var("HORAE_CPU_KERNEL").ok().as_deref().map(str::trim) {
                // `amx` is the default's name where AMX runs (`amx_runs`).
                None | Some("") | Some("amx") => best,
                Some(name) => match Isa::ALL.iter().find(|i| i.name() == name) {
                    Some(&cap) => cap,
                    None => {
                        let names: Vec<_> = Isa::ALL.iter().map(|i| i.name()).collect();
                        eprintln!("horae: HORAE_CPU_KERNEL={name:?} is not one of {}, amx; ignored", names.join(", "));
                        best
                    }
                },
            };
            let isa = *all.iter().rev().find(|&&i| i <= cap).expect("portable is always available");
            if best == Isa::Portable {
                eprintln!(
                    "horae: this CPU has neither AVX2 with FMA nor AVX-512; the portable CPU kernels run (several times slower)"
                );
            }
            isa
        })
    }

    const ALL: &'static [Isa] = &[
        Isa::Portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512,
    ];
}

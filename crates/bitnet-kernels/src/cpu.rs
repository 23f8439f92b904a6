//! CPU feature detection, once per process, with an environment override.
//!
//! `BITNET_CPU_TIER=scalar|avx2|avx512|amx` forces a tier no higher than what the CPU has, so one
//! machine can exercise every kernel against the scalar reference.

use std::sync::OnceLock;

/// Kernel tiers, lowest to highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Portable Rust; the reference every other tier must equal.
    Scalar,
    /// AVX2 (`vpmaddubsw`), with AVX-VNNI (`vpdpbusd` on 256-bit registers) when present.
    Avx2,
    /// AVX-512 BW + VNNI (`vpdpbusd` on 512-bit registers).
    Avx512,
    /// AVX-512 VNNI for decode plus AMX-INT8 tiles (`tdpbusd`) for prefill.
    Amx,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Tier::Scalar),
            "avx2" => Some(Tier::Avx2),
            "avx512" | "avx512vnni" | "vnni" => Some(Tier::Avx512),
            "amx" => Some(Tier::Amx),
            _ => None,
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the CPU offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx_vnni: bool,
    pub avx512bw: bool,
    pub avx512vnni: bool,
    pub avx512fp16: bool,
    /// AMX-INT8 tiles in the CPU.
    pub amx_int8: bool,
    /// The Linux kernel granted this process the AMX tile data state.
    pub amx_usable: bool,
}

impl Features {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Features {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                f16c: std::arch::is_x86_feature_detected!("f16c"),
                avx_vnni: std::arch::is_x86_feature_detected!("avxvnni"),
                avx512bw: std::arch::is_x86_feature_detected!("avx512bw"),
                avx512vnni: std::arch::is_x86_feature_detected!("avx512vnni"),
                avx512fp16: std::arch::is_x86_feature_detected!("avx512fp16"),
                amx_int8: amx_cpuid(),
                amx_usable: amx_cpuid() && crate::ternary::amx_permission(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Features::default()
    }

    /// The best tier these features allow.
    pub fn best_tier(&self) -> Tier {
        if self.avx512bw && self.avx512vnni && self.amx_usable {
            Tier::Amx
        } else if self.avx512bw && self.avx512vnni {
            Tier::Avx512
        } else if self.avx2 && self.fma && self.f16c {
            Tier::Avx2
        } else {
            Tier::Scalar
        }
    }
}

/// CPUID leaf 7: EDX bit 25 is AMX-INT8, bit 24 AMX-TILE.
#[cfg(target_arch = "x86_64")]
fn amx_cpuid() -> bool {
    // `__cpuid_count` is safe to call on x86_64: CPUID exists on every x86_64 CPU.
    let r = std::arch::x86_64::__cpuid_count(7, 0);
    r.edx & (1 << 25) != 0 && r.edx & (1 << 24) != 0
}

static FEATURES: OnceLock<Features> = OnceLock::new();
static TIER: OnceLock<Tier> = OnceLock::new();

/// The CPU's features (detected once).
pub fn features() -> &'static Features {
    FEATURES.get_or_init(Features::detect)
}

/// The tier kernels dispatch to: the best the CPU allows, lowered by `BITNET_CPU_TIER`.
pub fn tier() -> Tier {
    *TIER.get_or_init(|| {
        let best = features().best_tier();
        match std::env::var("BITNET_CPU_TIER")
            .ok()
            .and_then(|v| Tier::parse(&v))
        {
            Some(forced) => forced.min(best),
            None => best,
        }
    })
}

/// Every tier this CPU can run, lowest first (for tests that compare tiers).
pub fn available_tiers() -> Vec<Tier> {
    let best = features().best_tier();
    [Tier::Scalar, Tier::Avx2, Tier::Avx512, Tier::Amx]
        .into_iter()
        .filter(|t| *t <= best)
        .collect()
}

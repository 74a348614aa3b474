//! What the tuner times and a table may choose: one of our kernel's configurations, or one of
//! cuBLASLt's FP8 block-scaled algorithms ([`LtAlgo`], described by its parameters so that it
//! can be rebuilt later).

use std::fmt;
use std::str::FromStr;

use fp8forge_kernels::GemmConfig;
use fp8forge_kernels::cublaslt::{LT_ALGO_PREFIX, LtAlgo};
use serde::{Deserialize, Serialize};

/// A candidate: written as its id (a configuration id such as `wgmma_bm128_bn128_s4_mc1_sw128`,
/// or an algorithm id such as `cublaslt_a66_t20_s13_k1_r0_w0_c0_i0_l0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Candidate {
    /// Our kernel in this configuration.
    Own(GemmConfig),
    /// cuBLASLt FP8 block-scaled with this algorithm.
    CublasLt(LtAlgo),
}

/// Which implementation an entry runs (`impl` in a table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Impl {
    /// Our kernel (what tables without `impl` hold).
    #[default]
    Fp8forge,
    /// A cuBLASLt algorithm.
    Cublaslt,
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Impl::Fp8forge => "fp8forge",
            Impl::Cublaslt => "cublaslt",
        })
    }
}

impl Candidate {
    /// The id.
    pub fn id(&self) -> String {
        match self {
            Candidate::Own(c) => c.id(),
            Candidate::CublasLt(a) => a.id(),
        }
    }

    /// Which implementation runs it.
    pub fn implementation(&self) -> Impl {
        match self {
            Candidate::Own(_) => Impl::Fp8forge,
            Candidate::CublasLt(_) => Impl::Cublaslt,
        }
    }

    /// Our configuration, if it is one.
    pub fn own(&self) -> Option<GemmConfig> {
        match self {
            Candidate::Own(c) => Some(*c),
            Candidate::CublasLt(_) => None,
        }
    }

    /// The cuBLASLt algorithm, if it is one.
    pub fn lt(&self) -> Option<LtAlgo> {
        match self {
            Candidate::Own(_) => None,
            Candidate::CublasLt(a) => Some(*a),
        }
    }
}

impl From<GemmConfig> for Candidate {
    fn from(c: GemmConfig) -> Self {
        Candidate::Own(c)
    }
}

impl From<LtAlgo> for Candidate {
    fn from(a: LtAlgo) -> Self {
        Candidate::CublasLt(a)
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.id())
    }
}

impl FromStr for Candidate {
    type Err = String;

    /// An algorithm id (`cublaslt_...`) or a configuration id; an error naming it otherwise.
    fn from_str(s: &str) -> Result<Candidate, String> {
        if s.starts_with(LT_ALGO_PREFIX) {
            s.parse::<LtAlgo>().map(Candidate::CublasLt)
        } else {
            s.parse::<GemmConfig>().map(Candidate::Own).map_err(|e| e.to_string())
        }
    }
}

impl Serialize for Candidate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id())
    }
}

impl<'de> Deserialize<'de> for Candidate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Candidate, D::Error> {
        let id = String::deserialize(d)?;
        id.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8forge_kernels::Multicast;

    #[test]
    fn ids_tell_our_configurations_from_cublaslt_algorithms() {
        let own = Candidate::Own(GemmConfig::wgmma(128, 128, 4, Multicast::A));
        let lt = Candidate::CublasLt(LtAlgo {
            algo: 66,
            tile: 20,
            stages: 13,
            splitk: 1,
            reduction: 0,
            swizzle: 0,
            custom: 0,
            inner: 0,
            cluster: 2,
        });
        for c in [own, lt] {
            assert_eq!(c.id().parse::<Candidate>(), Ok(c));
        }
        assert_eq!((own.implementation(), lt.implementation()), (Impl::Fp8forge, Impl::Cublaslt));
        assert!(own.lt().is_none() && lt.own().is_none());
        assert!("cublaslt_a1".parse::<Candidate>().is_err());
        assert!("wgmma_bm7".parse::<Candidate>().is_err());
    }
}

//! Exact selection of kernel variants by family or id: what `FP8FORGE_GPU_FILTER` means for the
//! GPU tests and what `bench/gpu-check.sh` uses to run one family (or one configuration) per
//! process.
//!
//! A filter is a comma-separated list of terms; a configuration is selected when any term selects
//! it, and an empty filter selects the whole search space:
//!
//! - `family:NAME` — every configuration of the search space and of the speed variants whose
//!   [`family`] is exactly `NAME`: `mma` (the mma.sync kernel), `wgmma_bm{64,128,256}_{mc1,mcA2,mcB2}`
//!   (BLOCK_M and multicast of the wgmma kernel), e.g. `family:wgmma_bm128_mcA2`, or `speed`
//!   ([`speed_variants`]: pipelines deeper than the search space's);
//! - `id:ID` or a bare `ID` — exactly that configuration (parsed with
//!   [`GemmConfig::from_str`](std::str::FromStr), so it need not be in the search space), e.g.
//!   `wgmma_bm128_bn160_s4_mc1_sw128`.
//!
//! Nothing is matched by substring: `mma` alone is not an id, and `family:mma` never selects a
//! wgmma configuration.

use crate::config::{GemmConfig, GpuArch, KernelKind, Multicast, SEARCH_MAX_STAGES, Why, search_space, speed_variants};

/// A filter term that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// `family:` named no family of the search space.
    #[error("unknown family {name:?} (known: {known})")]
    UnknownFamily {
        /// The name given.
        name: String,
        /// The families of the search space, comma-separated.
        known: String,
    },
    /// A term that is not a configuration id.
    #[error("filter term {term:?}: {why}")]
    BadId {
        /// The term given.
        term: String,
        /// Why it does not parse.
        why: Why,
    },
}

/// The family of a configuration: `mma`; `speed` for a wgmma pipeline deeper than
/// [`SEARCH_MAX_STAGES`] or with compile-time B-scale selection; else `wgmma_bm<BM>_<multicast>` with the multicast token of its id
/// (`mc1`, `mcA2`, `mcB2`).
pub fn family(cfg: &GemmConfig) -> String {
    match cfg.kind {
        KernelKind::MmaSync { .. } => "mma".to_string(),
        KernelKind::Wgmma if cfg.stages > SEARCH_MAX_STAGES || cfg.static_b_scales => "speed".to_string(),
        KernelKind::Wgmma => {
            let mc = match cfg.multicast {
                Multicast::None => "mc1",
                Multicast::A => "mcA2",
                Multicast::B => "mcB2",
            };
            format!("wgmma_bm{}_{mc}", cfg.block_m)
        }
    }
}

/// Every configuration a filter chooses from: the search space, then the speed variants.
fn candidates(arch: GpuArch) -> Vec<GemmConfig> {
    search_space(arch).into_iter().chain(speed_variants(arch)).collect()
}

/// The families of `arch`'s search space and speed variants, in that order (each once).
pub fn families(arch: GpuArch) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for cfg in candidates(arch) {
        let f = family(&cfg);
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// One term of a filter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Family(String),
    Id(GemmConfig),
}

/// A parsed `FP8FORGE_GPU_FILTER`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VariantFilter {
    terms: Vec<Term>,
}

impl VariantFilter {
    /// Parses `text` for a device of `arch` (whose search space defines the families).
    ///
    /// # Errors
    ///
    /// [`FilterError`] for an unknown family or a term that is not a configuration id.
    pub fn parse(text: &str, arch: GpuArch) -> Result<VariantFilter, FilterError> {
        let known = families(arch);
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            terms.push(parse_term(term, &known)?);
        }
        Ok(VariantFilter { terms })
    }

    /// True when the filter has no terms (it selects the whole search space).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether `cfg` is selected.
    pub fn selects(&self, cfg: &GemmConfig) -> bool {
        self.is_empty()
            || self.terms.iter().any(|t| match t {
                Term::Family(f) => family(cfg) == *f,
                Term::Id(c) => c == cfg,
            })
    }

    /// The configurations selected on `arch`: the search space's and the speed variants, in
    /// order, then the named ids that are not among them; each once.
    pub fn select(&self, arch: GpuArch) -> Vec<GemmConfig> {
        let mut out: Vec<GemmConfig> = candidates(arch).into_iter().filter(|c| self.selects(c)).collect();
        for t in &self.terms {
            if let Term::Id(c) = t
                && !out.contains(c)
            {
                out.push(*c);
            }
        }
        out
    }
}

fn parse_term(term: &str, known: &[String]) -> Result<Term, FilterError> {
    if let Some(name) = term.strip_prefix("family:") {
        return if known.iter().any(|k| k == name) {
            Ok(Term::Family(name.to_string()))
        } else {
            Err(FilterError::UnknownFamily { name: name.to_string(), known: known.join(", ") })
        };
    }
    let id = term.strip_prefix("id:").unwrap_or(term);
    id.parse::<GemmConfig>().map(Term::Id).map_err(|why| FilterError::BadId { term: term.to_string(), why })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm90a_has_eleven_families_and_sm89_one() {
        let f = families(GpuArch::Sm90a);
        assert_eq!(f.len(), 11, "{f:?}");
        assert_eq!(f.last().map(String::as_str), Some("speed"));
        assert!(f.contains(&"mma".to_string()) && f.contains(&"wgmma_bm256_mcB2".to_string()));
        assert_eq!(families(GpuArch::Sm89), vec!["mma".to_string()]);
    }

    #[test]
    fn a_family_selects_exactly_its_configurations() {
        let filter = VariantFilter::parse("family:mma", GpuArch::Sm90a).unwrap();
        let picked = filter.select(GpuArch::Sm90a);
        assert_eq!(picked.len(), 21);
        assert!(picked.iter().all(|c| matches!(c.kind, KernelKind::MmaSync { .. })));
        let wg = VariantFilter::parse("family:wgmma_bm128_mcA2", GpuArch::Sm90a).unwrap().select(GpuArch::Sm90a);
        assert!(!wg.is_empty());
        assert!(wg.iter().all(|c| c.block_m == 128 && c.multicast == Multicast::A));
    }

    #[test]
    fn every_config_is_in_exactly_one_family() {
        let arch = GpuArch::Sm90a;
        let total: usize = families(arch)
            .iter()
            .map(|f| VariantFilter::parse(&format!("family:{f}"), arch).unwrap().select(arch).len())
            .sum();
        assert_eq!(total, search_space(arch).len() + speed_variants(arch).len());
        let speed = VariantFilter::parse("family:speed", arch).unwrap().select(arch);
        assert_eq!(speed, speed_variants(arch));
    }

    #[test]
    fn an_id_selects_one_configuration_even_outside_the_search_space() {
        let arch = GpuArch::Sm90a;
        let one = VariantFilter::parse("id:wgmma_bm128_bn128_s4_mc1_sw128", arch).unwrap().select(arch);
        assert_eq!(one.iter().map(GemmConfig::id).collect::<Vec<_>>(), ["wgmma_bm128_bn128_s4_mc1_sw128"]);
        let outside = VariantFilter::parse("wgmma_bm128_bn128_s3_mc1_sw64", arch).unwrap().select(arch);
        assert_eq!(outside.len(), 1);
        let both = VariantFilter::parse("family:mma, wgmma_bm64_bn96_s4_mc1_sw128", arch).unwrap().select(arch);
        assert_eq!(both.len(), 22);
    }

    #[test]
    fn substrings_and_unknown_families_are_refused() {
        let arch = GpuArch::Sm90a;
        assert!(matches!(VariantFilter::parse("mma_", arch), Err(FilterError::BadId { .. })));
        assert!(matches!(VariantFilter::parse("family:wgmma", arch), Err(FilterError::UnknownFamily { .. })));
        assert!(VariantFilter::parse(" , ", arch).unwrap().is_empty());
        assert_eq!(VariantFilter::parse("", arch).unwrap().select(arch), candidates(arch));
    }
}

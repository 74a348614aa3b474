//! Rendering: progress bars, JSON on stdout, byte sizes; and the two rules of everything printed:
//! names that come from files are escaped (a tensor name cannot forge lines or move the cursor),
//! and a closed or full stdout is an error to report, never a panic.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use fp8forge_formats::manifest::FileStatus;
use fp8forge_quant::convert::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// `text` with every control character (C0, DEL, C1) and bidirectional-override character
/// escaped (`\n`, `\t`, `\u{1b}`, ...), so that data from files (tensor and file names) prints as
/// one inert field: it cannot end a line or drive the terminal.
pub fn esc(text: &str) -> Cow<'_, str> {
    let special = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(special) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if special(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A path for messages, escaped like [`esc`].
pub fn esc_path(path: &std::path::Path) -> String {
    esc(&path.display().to_string()).into_owned()
}

/// Writes `text` to stdout. A reader that went away (a broken pipe, as with `| head`) ends the
/// program quietly with exit code 0: the work is done by the time anything is printed. Any other
/// failure (`> /dev/full`) is an error with exit code 1.
pub fn emit(text: &str) -> Result<(), crate::failure::Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(crate::failure::Failure::quiet(0)),
        Err(e) => Err(crate::failure::Failure {
            message: format!("cannot write to standard output: {e} (the work itself completed)"),
            code: 1,
        }),
    }
}

/// Prints a line on stderr (escaped), ignoring a closed or full stderr.
pub fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{}", esc(line));
}

/// The signal (SIGINT or SIGTERM) that asked the running command to stop; 0 while none has.
pub static INTERRUPT: AtomicUsize = AtomicUsize::new(0);

/// A bytes-and-tensors progress bar on stderr (hidden with `--quiet`/`--json` or off a terminal).
/// It tells the library to stop once [`INTERRUPT`] is set.
pub struct Bar {
    bar: ProgressBar,
    tensors: Mutex<(usize, usize)>,
}

impl Bar {
    /// A bar, visible unless `hidden`.
    pub fn new(hidden: bool, verb: &str) -> Self {
        let bar = ProgressBar::with_draw_target(
            None,
            if hidden { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() },
        );
        let style = ProgressStyle::with_template(&format!(
            "{verb} {{bar:30}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Bar { bar, tensors: Mutex::new((0, 0)) }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn begin(&self, bytes: u64, tensors: usize) {
        self.bar.set_length(bytes);
        if let Ok(mut t) = self.tensors.lock() {
            *t = (0, tensors);
        }
    }

    fn tensor_done(&self, _name: &str, bytes: u64) {
        self.bar.inc(bytes);
        if let Ok(mut t) = self.tensors.lock() {
            t.0 += 1;
            self.bar.set_message(format!("{}/{} tensors", t.0, t.1));
        }
    }

    fn notice(&self, line: &str) {
        self.bar.suspend(|| note(&format!("fp8forge: {line}")));
    }

    fn cancelled(&self) -> bool {
        INTERRUPT.load(Ordering::Relaxed) != 0
    }
}

/// A progress bar over evaluation steps (one layer over one window) on stderr.
pub struct StepBar {
    bar: ProgressBar,
}

impl StepBar {
    /// A bar, visible unless `hidden`.
    pub fn new(hidden: bool, verb: &str) -> Self {
        let bar = ProgressBar::with_draw_target(
            None,
            if hidden { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() },
        );
        let style =
            ProgressStyle::with_template(&format!("{verb} {{bar:30}} {{pos}}/{{len}} layer×window ETA {{eta}}"))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        StepBar { bar }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl fp8forge_runtime::eval::EvalProgress for StepBar {
    fn begin(&self, steps: u64) {
        self.bar.set_position(0);
        self.bar.set_length(steps);
    }

    fn advance(&self, steps: u64) {
        self.bar.inc(steps);
    }
}

/// The human summary of an evaluation's estimated cost (`eval --dry-run`).
pub fn render_estimate(e: &fp8forge_runtime::cost::EvalEstimate) -> String {
    let c = &e.calibration;
    let mut out = format!(
        "{}{}: {} layers, {} tokens in {} windows of up to {}, {} on {} threads\n",
        esc(&e.model),
        e.baseline.as_deref().map(|b| format!(" against {}", esc(b))).unwrap_or_default(),
        e.layers,
        e.tokens,
        e.windows,
        e.ctx,
        if e.streamed { "streamed one layer at a time" } else { "all layers resident" },
        e.threads,
    );
    out += &format!(
        "  read     {} once: about {} at {}/s (measured; page cache if the files were read recently)\n",
        human_bytes(e.bytes_to_read),
        human_seconds(e.read_seconds),
        human_bytes(c.read_bytes_per_second as u64),
    );
    out += &format!("  memory   about {} at peak\n", human_bytes(e.peak_memory_bytes));
    out += &format!("  compute  {:.3e} multiply-adds: about {}\n", e.multiply_adds, human_seconds(e.compute_seconds));
    for p in &c.products {
        out += &format!(
            "           {}: {:.3} ns per weight element read, {:.4} ns per multiply-add (timed on {})\n",
            p.weights,
            p.decode_ns_per_element,
            p.fma_ns,
            esc(&p.matrix),
        );
    }
    out += &format!("  total    about {} (calibration took {:.1} s)\n", human_seconds(e.seconds), c.seconds);
    out
}

/// `90 s`, `12 min`, `3.4 h`, `2.1 days`.
fn human_seconds(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

/// The human summary of an evaluation.
pub fn render_eval(r: &fp8forge_runtime::metrics::EvalResult) -> String {
    let mut out = format!(
        "{} ({}, {}; act-quant {}): perplexity {:.4} ± {:.4} over {} tokens ({} windows of {}){}\n",
        esc(&r.model),
        r.model_type,
        r.weights,
        r.act_quant,
        r.perplexity,
        r.perplexity_stderr,
        r.tokens_scored,
        r.windows,
        r.ctx,
        if r.streamed { ", layers streamed" } else { "" }
    );
    if let Some(b) = &r.baseline {
        let delta = 100.0 * (r.perplexity / b.baseline_perplexity - 1.0);
        out += &format!(
            "baseline {}: perplexity {:.4} ± {:.4} ({delta:+.3}%)\n\
             KL divergence mean {:.3e}, p99 {:.3e}, max {:.3e}; top-1 agreement {:.4}; routing agreement {:.4}\n",
            esc(&b.baseline_model),
            b.baseline_perplexity,
            b.baseline_perplexity_stderr,
            b.kld_mean,
            b.kld_p99,
            b.kld_max,
            b.top1_agreement,
            b.routing_agreement
        );
        out += &llama_cpp_lines(b);
        for l in &r.layers {
            let ra = l.routing_agreement.map(|x| format!(", routing agreement {x:.4}")).unwrap_or_default();
            let he = l.hidden_rel_err.map(|x| format!("hidden rel. error {x:.3e}")).unwrap_or_default();
            out += &format!("  layer {:>3}: {he}{ra}\n", l.layer);
        }
    }
    out += &format!("{:.1} s, {:.0} tokens/s\n", r.seconds, r.tokens_per_second);
    out
}

/// The figures of llama.cpp's `perplexity --kl-divergence`, under its names.
fn llama_cpp_lines(b: &fp8forge_runtime::metrics::Comparison) -> String {
    let percentiles: Vec<String> =
        b.kld_percentiles.levels().iter().map(|(label, v)| format!("{label} {v:.3e}")).collect();
    format!(
        "ln(PPL(Q)/PPL(base)) {:+.6} ± {:.6}; mean Δp {:+.3}% ± {:.3}%, RMS Δp {:.3}% ± {:.3}%; \
         same top p {:.3}% ± {:.3}%; top-5 agreement {:.4}, overlap {:.4}\n\
         KL divergence percentiles: {}\n",
        b.ln_ppl_ratio,
        b.ln_ppl_ratio_stderr,
        100.0 * b.delta_p_mean,
        100.0 * b.delta_p_mean_stderr,
        100.0 * b.delta_p_rms,
        100.0 * b.delta_p_rms_stderr,
        100.0 * b.top1_agreement,
        100.0 * b.top1_agreement_stderr,
        b.top5_agreement,
        b.top5_overlap,
        percentiles.join(", ")
    )
}

/// Prints one JSON object on stdout.
pub fn print_json<T: Serialize>(v: &T) -> Result<(), crate::failure::Failure> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| crate::failure::Failure { message: format!("cannot render JSON: {e}"), code: 1 })?;
    s.push('\n');
    emit(&s)
}

/// A byte count for people: "1.23 GB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

/// Parses a size like `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 5GB, 500MB, 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        u => return Err(format!("invalid size unit {u:?} in {s:?}")),
    };
    let v = num * mult;
    if v < 1.0 { Err(format!("size {s:?} must be at least one byte")) } else { Ok(v as u64) }
}

/// The plan of `convert --dry-run`, for people.
pub fn render_plan(plan: &fp8forge_quant::plan::Plan) -> Result<String, fp8forge_quant::plan::PlanError> {
    use fp8forge_quant::plan::Action;
    let s = plan.summary();
    let mut out = format!(
        "plan {}: {} tensors ({} quantized, {} kept), {} -> {} in {} files\n",
        &plan.digest()?[..12],
        s.tensors,
        s.quantized,
        s.copied,
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        s.files
    );
    for f in &plan.files {
        out += &format!(
            "{} ({}) <- {}\n",
            esc(&f.name),
            human_bytes(f.data_bytes()),
            esc(&plan.input_shards[f.input_shard])
        );
        for i in &f.items {
            match &i.action {
                Action::Quantize { rows, cols } => out += &format!("  fp8   {} [{rows}, {cols}]\n", esc(&i.source)),
                Action::Copy { reason } => out += &format!("  keep  {} ({})\n", esc(&i.source), esc(reason)),
            }
        }
    }
    for c in &plan.copies {
        out += &format!("copy  {}\n", esc(c));
    }
    for c in &plan.not_copied {
        out += &format!("not copied: {}\n", esc(c));
    }
    Ok(out)
}

/// `inspect` for people: a summary, then one line per tensor.
pub fn render_inspection(r: &fp8forge_quant::inspect::Inspection) -> String {
    let total: u64 = r.files.iter().map(|f| f.bytes).sum();
    let mut out = format!(
        "{}: {} tensors in {} files, {}; state: {}\n",
        esc_path(&r.path),
        r.tensors.len(),
        r.files.len(),
        human_bytes(total),
        r.state
    );
    for (dtype, d) in &r.by_dtype {
        out += &format!("  {dtype:<8} {:>7} tensors {:>12}\n", d.tensors, human_bytes(d.bytes));
    }
    if let Some(q) = &r.quantization {
        out += &format!("quantization_config: {}\n", esc(&q.to_string()));
    }
    for t in &r.tensors {
        out += &format!(
            "{:<12} {:<8} {:<18} {:>10}  {}\n",
            t.role.name(),
            t.dtype,
            format!("{:?}", t.shape),
            human_bytes(t.bytes),
            esc(&t.name)
        );
    }
    out
}

/// `verify` for people: problems first, then the error table.
pub fn render_verify(r: &fp8forge_quant::verify::VerifyReport) -> String {
    let mut out = String::new();
    // Files the manifest lists are checked; unlisted ones are "not ok" only where the manifest
    // must list them (weights, index, config.json), and otherwise appear among the warnings.
    let checked = r.files.iter().filter(|f| f.status != FileStatus::Unlisted).count();
    let bad = r.files.iter().filter(|f| f.problem).count();
    out += &format!("manifest: {checked} files checked, {bad} not ok\n");
    for f in r.files.iter().filter(|f| f.problem) {
        out += &format!("  {}: {}\n", esc(&f.file), f.status.name());
    }
    for w in &r.warnings {
        out += &format!("warning: {}\n", esc(w));
    }
    for p in &r.problems {
        out += &format!("problem: {}\n", esc(p));
    }
    if !r.tensors.is_empty() {
        out += &format!("{:>10} {:>12} {:>8}  tensor\n", "rel_rms", "max_abs_err", "snr_db");
        for t in &r.tensors {
            let snr = t.snr_db.map_or("inf".to_string(), |s| format!("{s:.1}"));
            out += &format!("{:>10.5} {:>12.3e} {snr:>8}  {}\n", t.rel_rms, t.max_abs_err, esc(&t.name));
        }
    }
    if let Some(w) = &r.worst {
        out += &format!("worst: {} rel_rms {:.5}\n", esc(&w.name), w.rel_rms);
    }
    out += if r.ok { "OK\n" } else { "FAILED\n" };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }
}

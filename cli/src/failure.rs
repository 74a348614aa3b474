//! The one error path of the CLI: every command returns a [`Failure`] (a message and an exit
//! code), which `main` prints as one escaped line.

use fp8forge_autotune::tune::TuneError;
use fp8forge_formats::FormatError;
use fp8forge_formats::error::Refusal;
use fp8forge_quant::convert::ConvertError;
use fp8forge_runtime::RuntimeError;
use fp8forge_runtime::error::WindowProblem;

/// An error for the user: one line, and the exit code.
pub struct Failure {
    /// The message (nothing is printed when it is empty).
    pub message: String,
    /// 1 runtime failure, 2 bad input or usage; 0 for a quiet end (stdout closed by its reader);
    /// 128 + the signal for an interrupted run.
    pub code: u8,
}

impl Failure {
    /// Ends the program with `code` and no message.
    pub fn quiet(code: u8) -> Self {
        Failure { message: String::new(), code }
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Self {
        let code = if e.is_bad_input() { 2 } else { 1 };
        let message = match &e {
            RuntimeError::Format(f) | RuntimeError::Convert(ConvertError::Format(f)) => {
                with_hint(e.to_string(), remedy(f))
            }
            RuntimeError::Window { file, ctx, why } => {
                let hint = matches!(why, WindowProblem::TooMuchMemory { .. }).then_some("use a smaller --ctx");
                with_hint(format!("{}: --ctx {ctx}: {why}", file.display()), hint)
            }
            RuntimeError::NoFp8Layers { file } => format!(
                "{}: --act-quant fp8 quantizes the inputs of FP8 layers, and this model has none (no quantization_config); \
                 convert it first, or evaluate it with --act-quant none",
                file.display()
            ),
            RuntimeError::StaticActivations { .. } => with_hint(e.to_string(), Some("use --act-quant none")),
            _ => e.to_string(),
        };
        Failure { code, message }
    }
}

/// The flag that gets past a refusal of the libraries, in the CLI's words.
fn remedy(e: &FormatError) -> Option<&'static str> {
    match e {
        FormatError::Refused { why, .. } => Some(match why {
            Refusal::OtherUnfinished { .. } | Refusal::UnusableState { .. } => "use --force to start over",
            Refusal::OtherFinished { .. } | Refusal::UnrecordedCheckpoint => "use --force to overwrite it",
            Refusal::NotEmpty => "use --force to write into it (files a conversion writes are replaced, others kept)",
            Refusal::ChangedSince { .. } => "use --force to convert again",
        }),
        FormatError::InputChanged { .. } => Some("use --force to start over from the current input"),
        _ => None,
    }
}

fn with_hint(message: String, hint: Option<&str>) -> String {
    match hint {
        Some(h) => format!("{message}; {h}"),
        None => message,
    }
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Self {
        if let ConvertError::Interrupted = e {
            let sig = crate::output::INTERRUPT.load(std::sync::atomic::Ordering::Relaxed);
            let name = if sig == signal_hook::consts::SIGTERM as usize { "SIGTERM" } else { "SIGINT" };
            return Failure { code: 128 + (sig as u8 & 0x7f), message: format!("{name}: {e}") };
        }
        let message = match &e {
            ConvertError::ForceInJob { path } => format!(
                "{}: --force cannot be combined with --shard (one job would delete the others' files); \
                 start over with one run of --force, or remove OUT first",
                path.display()
            ),
            ConvertError::Format(f) => with_hint(e.to_string(), remedy(f)),
            _ => e.to_string(),
        };
        Failure { code: if e.is_bad_input() { 2 } else { 1 }, message }
    }
}

impl From<TuneError> for Failure {
    fn from(e: TuneError) -> Self {
        Failure { code: if e.is_bad_input() { 2 } else { 1 }, message: e.to_string() }
    }
}

//! The one error path of the CLI: every command returns a [`Failure`] (a message and an exit
//! code), which `main` prints as one escaped line.

use fp8forge_autotune::tune::TuneError;
use fp8forge_quant::convert::ConvertError;
use fp8forge_runtime::RuntimeError;

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
        Failure { code: if e.is_bad_input() { 2 } else { 1 }, message: e.to_string() }
    }
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Self {
        if let ConvertError::Interrupted = e {
            let sig = crate::output::INTERRUPT.load(std::sync::atomic::Ordering::Relaxed);
            let name = if sig == signal_hook::consts::SIGTERM as usize { "SIGTERM" } else { "SIGINT" };
            return Failure { code: 128 + (sig as u8 & 0x7f), message: format!("{name}: {e}") };
        }
        Failure { code: if e.is_bad_input() { 2 } else { 1 }, message: e.to_string() }
    }
}

impl From<TuneError> for Failure {
    fn from(e: TuneError) -> Self {
        Failure { code: if e.is_bad_input() { 2 } else { 1 }, message: e.to_string() }
    }
}

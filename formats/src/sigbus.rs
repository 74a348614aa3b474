//! A file truncated while it is memory-mapped: one line and an exit code, not a crash.
//!
//! Reading a page of a map that lies past the end of its (since truncated) file raises SIGBUS,
//! whose default action kills the process with no word on which file. Reading the inputs with
//! `pread` instead would turn it into an ordinary I/O error, but every tensor would then be copied
//! into a buffer before use, for every shard of every conversion, verification and evaluation, to
//! guard against a file being changed under a running job: the map is kept, and the fault is
//! handled instead.
//!
//! The mechanism: [`install`] puts a SIGBUS handler in place once per process (the binary does it
//! at the start of `main`; a library user that does not keeps the default action). Each
//! [`crate::SafetensorsFile`] registers its map's address range in a slot of a fixed table on
//! open, with its message prepared, and frees the slot on drop, before the map goes. The
//! handler looks the faulting address up in the table: inside a registered map it writes that
//! map's line with `write(2)` and ends the process with `_exit(code)`; anywhere else it hands the
//! signal to the action that was in place before (Rust's own stack-overflow handler, or the
//! default). It touches only atomics and the registered message bytes: async-signal-safe.
//!
//! Why a message cannot be freed under the handler: the handler reads a slot's message only when
//! the faulting address lies in that slot's map. A fault inside a live map comes from a reader
//! that borrows the file, so the file (and its message) outlives the handler, which never returns.
//! A slot is freed before its map is unmapped, so once a range is unmapped (and perhaps reused by
//! another map, which can then fault) the slot that named it is already free.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, AtomicUsize, Ordering::SeqCst};

use crate::error::EscPath;

/// Number of maps guarded at once; a map opened while all are taken is not guarded (its
/// truncation then gets the default SIGBUS action).
const SLOTS: usize = 4096;

const FREE: u8 = 0;
const TAKEN: u8 = 1;
const LIVE: u8 = 2;

/// One registered map.
struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    msg: AtomicPtr<u8>,
    msg_len: AtomicUsize,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            msg: AtomicPtr::new(std::ptr::null_mut()),
            msg_len: AtomicUsize::new(0),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// The text before each message (`"fp8forge: error: "`), set once by [`install`].
static PREFIX: OnceLock<&'static str> = OnceLock::new();
/// The exit code after a message.
static CODE: AtomicI32 = AtomicI32::new(2);
/// The SIGBUS action in place before ours, to hand other faults to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Installs the handler (once per process; later calls do nothing): a SIGBUS raised by reading
/// the map of an open [`crate::SafetensorsFile`] prints
/// `{prefix}{path}: truncated while being read (...)` on stderr and exits with `code`. Files
/// opened before this call are not guarded.
pub fn install(prefix: &'static str, code: i32) {
    if PREFIX.get().is_some() {
        return;
    }
    CODE.store(code, SeqCst);
    // SAFETY: a zeroed sigaction is a valid value (no handler, empty mask, no flags); the handler
    // is an `extern "C"` function of the SA_SIGINFO signature, and it is async-signal-safe.
    let installed = unsafe {
        let mut ours: libc::sigaction = std::mem::zeroed();
        ours.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut ours.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        let ok = libc::sigaction(libc::SIGBUS, &ours, &mut previous) == 0;
        if ok {
            let _ = PREVIOUS.set(previous);
        }
        ok
    };
    if installed {
        let _ = PREFIX.set(prefix);
    }
}

/// The registration of one map: frees its slot on drop. Must be dropped before the map is
/// unmapped (declare it before the map in a struct: fields drop in order).
#[derive(Debug)]
pub(crate) struct Guard {
    slot: Option<usize>,
    /// The message the slot points to (kept here, on the heap, where the slot's pointer stays valid).
    _msg: Box<[u8]>,
}

impl Guard {
    /// Registers the map `[start, start + len)` of the file `path`. Without [`install`], or with
    /// every slot taken, nothing is registered.
    pub(crate) fn register(path: &std::path::Path, start: *const u8, len: usize) -> Guard {
        let none = Guard { slot: None, _msg: Box::default() };
        let Some(prefix) = PREFIX.get() else { return none };
        if len == 0 {
            return none;
        }
        let Some(i) = TABLE.iter().position(|s| s.state.compare_exchange(FREE, TAKEN, SeqCst, SeqCst).is_ok()) else {
            return none;
        };
        let msg = format!(
            "{prefix}{}: truncated while being read (an input must not change while fp8forge runs)\n",
            EscPath(path)
        );
        let mut msg = msg.into_bytes().into_boxed_slice();
        let s = &TABLE[i];
        s.start.store(start as usize, SeqCst);
        s.len.store(len, SeqCst);
        s.msg.store(msg.as_mut_ptr(), SeqCst);
        s.msg_len.store(msg.len(), SeqCst);
        s.state.store(LIVE, SeqCst);
        Guard { slot: Some(i), _msg: msg }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            TABLE[i].state.store(FREE, SeqCst);
        }
    }
}

/// The SIGBUS handler (see the module's comment).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_addr is
    // meaningful for a fault (si_code > 0), not for a signal sent with kill (si_code <= 0).
    let fault = unsafe { (!info.is_null() && (*info).si_code > 0).then(|| (*info).si_addr() as usize) };
    if let Some(addr) = fault {
        for s in &TABLE {
            if s.state.load(SeqCst) == LIVE && addr.wrapping_sub(s.start.load(SeqCst)) < s.len.load(SeqCst) {
                let (p, n) = (s.msg.load(SeqCst), s.msg_len.load(SeqCst));
                let mut done = 0;
                while done < n {
                    // SAFETY: `p..p + n` is the message of a live registration (see the module's
                    // comment); write(2) and reading errno are async-signal-safe.
                    let w = unsafe { libc::write(2, p.add(done).cast(), n - done) };
                    if w > 0 {
                        done += w as usize;
                    } else if w < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                        continue;
                    } else {
                        break;
                    }
                }
                // SAFETY: _exit is async-signal-safe and ends the process at once.
                unsafe { libc::_exit(CODE.load(SeqCst)) };
            }
        }
    }
    chain(sig, info, ctx, fault.is_some());
}

/// Hands a SIGBUS that is not ours to the action that was in place before (for a fault), or to
/// the default action (for a signal sent with kill, which no fault handler is meant for: Rust's
/// own would drop it).
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, fault: bool) {
    let previous = PREVIOUS.get().map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    let flags = PREVIOUS.get().map_or(0, |p| p.sa_flags);
    if !fault || previous == libc::SIG_DFL || previous == libc::SIG_IGN {
        // Back to the default action: a fault re-executes the access and gets it at once; a
        // signal sent with kill is raised again, and delivered when this handler returns.
        // SAFETY: sigaction and raise are async-signal-safe; a zeroed sigaction is SIG_DFL.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            if !fault {
                libc::raise(sig);
            }
        }
    } else if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so this is its handler of
        // that signature, called as the kernel would have.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(previous) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use super::*;
    use crate::SafetensorsFile;

    /// The variable that tells a re-run of this test binary to act as the child of a test.
    const CHILD: &str = "FP8FORGE_SIGBUS_TEST_CHILD";

    /// A 1 MiB safetensors file of one U8 tensor.
    fn big_file(dir: &Path) -> PathBuf {
        let p = dir.join("big.safetensors");
        let (mut bytes, data_len) =
            crate::header::serialize_header(&[("t".into(), safetensors::Dtype::U8, vec![1 << 20])], None);
        bytes.resize(bytes.len() + data_len as usize, 7);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn live_slots() -> usize {
        TABLE.iter().filter(|s| s.state.load(SeqCst) == LIVE).count()
    }

    /// Re-runs this test binary on test `name` alone, with `CHILD` set to `what`.
    fn child(name: &str, what: &str, file: &Path) -> Output {
        let exe = std::env::current_exe().expect("current exe");
        Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, what)
            .env("FP8FORGE_SIGBUS_TEST_FILE", file)
            .output()
            .expect("run child")
    }

    /// In a child: reads every byte of the file's tensor after truncating the file to 4 KiB.
    fn truncate_and_read(f: &SafetensorsFile) -> u64 {
        let t = f.header().tensors[0].clone();
        let file = std::fs::OpenOptions::new().write(true).open(f.path()).expect("open for writing");
        file.set_len(4096).expect("truncate");
        f.data(&t).iter().map(|&b| u64::from(b)).sum()
    }

    #[test]
    fn reading_a_truncated_file_prints_one_line_naming_it_and_exits_with_the_code() {
        const NAME: &str = "sigbus::tests::reading_a_truncated_file_prints_one_line_naming_it_and_exits_with_the_code";
        if std::env::var(CHILD).as_deref() == Ok("guarded") {
            let path = PathBuf::from(std::env::var_os("FP8FORGE_SIGBUS_TEST_FILE").expect("file"));
            install("test: error: ", 3);
            let before = live_slots();
            let first = SafetensorsFile::open(&path).expect("open");
            assert_eq!(live_slots(), before + 1, "a slot taken on open");
            drop(first);
            assert_eq!(live_slots(), before, "the slot freed on drop");
            let f = SafetensorsFile::open(&path).expect("open");
            let sum = truncate_and_read(&f);
            println!("read the whole tensor (sum {sum}) without a fault");
            std::process::exit(0);
        }
        if std::env::var_os(CHILD).is_some() {
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        let p = big_file(d.path());
        let out = child(NAME, "guarded", &p);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "exit status {:?}; stderr: {err}", out.status);
        let lines: Vec<&str> = err.lines().collect();
        let expected = format!("test: error: {}: truncated while being read", p.display());
        assert!(
            lines.len() == 1 && lines[0].starts_with(&expected),
            "stderr is not the one line {expected:?}: {err:?}"
        );
    }

    #[test]
    fn a_fault_outside_guarded_maps_keeps_the_default_action() {
        const NAME: &str = "sigbus::tests::a_fault_outside_guarded_maps_keeps_the_default_action";
        if std::env::var(CHILD).as_deref() == Ok("unguarded") {
            let path = PathBuf::from(std::env::var_os("FP8FORGE_SIGBUS_TEST_FILE").expect("file"));
            install("test: error: ", 3);
            let file = std::fs::File::open(&path).expect("open");
            // SAFETY: a test of what happens when a mapped file shrinks.
            let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
            std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(4096).expect("truncate");
            let sum: u64 = map.iter().map(|&b| u64::from(b)).sum();
            println!("read the whole map (sum {sum}) without a fault");
            std::process::exit(0);
        }
        if std::env::var(CHILD).as_deref() == Ok("killed") {
            install("test: error: ", 3);
            // SAFETY: raising a signal has no precondition.
            unsafe { libc::raise(libc::SIGBUS) };
            std::process::exit(0);
        }
        if std::env::var_os(CHILD).is_some() {
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        let p = big_file(d.path());
        for what in ["unguarded", "killed"] {
            let out = child(NAME, what, &p);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{what}: status {:?}; stderr: {err}", out.status);
            assert!(!err.contains("test: error:"), "{what}: a message for a map that is not guarded: {err}");
        }
    }
}

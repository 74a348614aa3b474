//! An output checkpoint directory that one run, or the jobs of a job array, fill without ever
//! losing data or showing a partial checkpoint under final names.
//!
//! While it is written, OUT holds the state directory `OUT/.fp8forge/`:
//! - `lock`: held exclusively by a run that writes the whole output, shared by the jobs of an
//!   array (each job also holds `lock-I-of-N` exclusively). It is taken before anything in OUT is
//!   looked at or changed, so no two runs write the same files and `--force` never takes OUT from
//!   a running conversion.
//! - `journal.json`: the [`Identity`] of the output being written (the plan digest, and the size
//!   and modification time of every input file), recorded before any file is written. A later run
//!   continues only an output of its own identity: same plan, unchanged inputs.
//! - `files/`: the output files, each written under a temporary name, fsynced and renamed when
//!   complete, and `done/NAME`: the sha256 and size of each complete one.
//! - `commit.json`: written once every file, config.json, the index and `SHA256SUMS` included, is
//!   complete in `files/`. It is the point after which the output exists: the files are then
//!   moved into OUT (renames only; config.json, then `SHA256SUMS`, then the record, last), and the
//!   state directory is removed. A run stopped during these renames is finished by the next run
//!   on OUT, of any kind. Before it, nothing of the output is under a final name in OUT.
//!
//! A finished OUT holds the checkpoint, `SHA256SUMS` and [`RECORD_NAME`]: the identity it was made
//! from and every file's size, so that a rerun, a `--resume` or a job of the array on a finished
//! output recognizes it, exits successfully and changes nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic::{WrittenFile, copy_atomic, is_partial_name, sync_parent, write_atomic};
use crate::checkpoint::{INDEX_NAME, pretty_json};
use crate::error::{FormatError, Refusal, Result};
use crate::lock::DirLock;
use crate::manifest::{MANIFEST_NAME, write_manifest};
use crate::writer::PlannedTensor;

/// Name of the state directory inside OUT while an output is unfinished.
pub const STATE_DIR: &str = ".fp8forge";

/// Name of the record a finished output keeps in OUT (hidden; not in `SHA256SUMS`).
pub const RECORD_NAME: &str = ".fp8forge-done.json";

const JOURNAL: &str = "journal.json";
const COMMIT: &str = "commit.json";
const FILES: &str = "files";
const DONE: &str = "done";
const LOCK: &str = "lock";
const CONFIG: &str = "config.json";

/// The size and modification time of one input file: enough to tell that it was rewritten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputStamp {
    /// The file, relative to the input directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time: seconds since the Unix epoch.
    pub mtime_s: i64,
    /// Modification time: the nanoseconds part.
    pub mtime_ns: i64,
}

/// What an output is made from: equal identities, identical output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    /// Digest of the plan (input names, shapes and dtypes, options).
    pub plan: String,
    /// Every input file read, in a fixed order.
    pub inputs: Vec<InputStamp>,
    /// The input directory (for messages; not compared).
    #[serde(skip)]
    pub root: PathBuf,
}

impl Identity {
    /// The identity of a plan of digest `plan` over the files `files` of the directory `root`
    /// (symbolic links followed, as they are read).
    pub fn stamp(plan: String, root: &Path, files: &[String]) -> Result<Self> {
        let mut inputs = Vec::with_capacity(files.len());
        for f in files {
            let p = root.join(f);
            let m = std::fs::metadata(&p).map_err(FormatError::io(&p, "stat"))?;
            inputs.push(InputStamp { file: f.clone(), size: m.len(), mtime_s: m.mtime(), mtime_ns: m.mtime_nsec() });
        }
        Ok(Identity { plan, inputs, root: root.to_owned() })
    }

    /// Checks that `recorded` (an identity read from OUT) is this one, `since` saying when it was
    /// recorded: a different plan is refused as another conversion's output, a changed input
    /// file is named.
    fn check_same(&self, recorded: &Identity, out: &Path, since: Since) -> Result<()> {
        if recorded.plan != self.plan {
            let (there, now) = (short(&recorded.plan).to_owned(), short(&self.plan).to_owned());
            let why = match since {
                Since::Started => Refusal::OtherUnfinished { there, now },
                Since::Finished => Refusal::OtherFinished { there, now },
            };
            return Err(FormatError::Refused { path: out.to_owned(), why });
        }
        for now in &self.inputs {
            let path = self.root.join(&now.file);
            let changed = |what: String| FormatError::InputChanged { path: path.clone(), since: since.text(), what };
            let Some(then) = recorded.inputs.iter().find(|s| s.file == now.file) else {
                return Err(changed("not an input then".into()));
            };
            if then.size != now.size {
                return Err(changed(format!("size {} -> {} bytes", then.size, now.size)));
            }
            if (then.mtime_s, then.mtime_ns) != (now.mtime_s, now.mtime_ns) {
                return Err(changed(format!(
                    "modified: mtime {}.{:09} -> {}.{:09}",
                    then.mtime_s, then.mtime_ns, now.mtime_s, now.mtime_ns
                )));
            }
        }
        Ok(())
    }
}

/// When an identity found in OUT was recorded.
#[derive(Clone, Copy)]
enum Since {
    /// In the journal of an unfinished output.
    Started,
    /// In the record of a finished one.
    Finished,
}

impl Since {
    fn text(self) -> &'static str {
        match self {
            Since::Started => "this conversion started",
            Since::Finished => "the output was finished",
        }
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// The record of a finished output.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    identity: Identity,
    /// Every file of the output with its size, `SHA256SUMS` included.
    files: Vec<RecordFile>,
}

/// One file of a finished output.
#[derive(Debug, Serialize, Deserialize)]
struct RecordFile {
    name: String,
    bytes: u64,
}

/// How a run takes part in writing the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Writes whatever is missing and commits the output. With `force`, starts over: the state
    /// of an unfinished output and the files a conversion writes are removed first (other files
    /// in OUT are kept).
    Whole {
        /// Start over.
        force: bool,
    },
    /// Job `index` (0-based) of `count` of a job array: writes its share of the files, never
    /// commits; the jobs may run at once.
    Job {
        /// This job.
        index: usize,
        /// Jobs in the array.
        count: usize,
    },
}

/// What [`OutputDir::open`] found.
pub enum Opened {
    /// OUT holds the finished output of this identity: there is nothing to do.
    Complete,
    /// OUT is ready for this run's files.
    Writing(OutputDir),
}

/// An output directory held by this run (its locks are released on drop).
#[derive(Debug)]
pub struct OutputDir {
    out: PathBuf,
    state: PathBuf,
    identity: Identity,
    role: Role,
    _locks: Vec<DirLock>,
}

impl OutputDir {
    /// Opens `out` for the output of `identity`: creates it if needed, takes the locks of `role`,
    /// then decides, under them, whether the output is finished, to be continued, to be started,
    /// or not this run's to write. `copies` names the files carried over from the input besides
    /// the checkpoint's own (with those, what `--force` removes from OUT; every other file is
    /// kept).
    ///
    /// # Errors
    ///
    /// [`FormatError::Output`] when OUT is another run's (locked), another conversion's, not
    /// empty, or a finished output that has been changed since; [`FormatError::InputChanged`]
    /// when an input file changed since the output was started or finished from it.
    pub fn open(out: &Path, identity: Identity, role: Role, copies: &[String]) -> Result<Opened> {
        let refuse = |reason: &str| FormatError::Output { path: out.to_owned(), reason: reason.into() };
        if std::fs::symlink_metadata(out).is_ok() && !out.is_dir() {
            return Err(refuse("exists and is not a directory"));
        }
        // A finished output needs no lock, so a retry succeeds even on a read-only OUT.
        let force = role == Role::Whole { force: true };
        if !force && !out.join(STATE_DIR).exists() && finished(out, &identity)? {
            return Ok(Opened::Complete);
        }
        std::fs::create_dir_all(out).map_err(FormatError::io(out, "create"))?;
        let state = out.join(STATE_DIR);
        let locks = match role {
            Role::Whole { .. } => vec![DirLock::acquire(&state.join(LOCK))?],
            Role::Job { index, count } => vec![
                DirLock::acquire_shared(&state.join(LOCK))?,
                DirLock::acquire(&state.join(format!("{LOCK}-{}-of-{count}", index + 1)))?,
            ],
        };
        let dir = OutputDir { out: out.to_owned(), state: state.clone(), identity, role, _locks: locks };
        let settled = dir.settle(copies);
        if settled.is_err() && matches!(role, Role::Whole { .. }) {
            // Refused: leave OUT as it was found, without the state folder this run created to
            // hold its lock (a state with anything but lock files in it is another run's).
            remove_if_only_locks(&state);
        }
        settled
    }

    /// Under the locks: finishes an interrupted commit, then sorts OUT out.
    fn settle(self, copies: &[String]) -> Result<Opened> {
        let out = self.out.clone();
        let refuse = |why: Refusal| FormatError::Refused { path: out.clone(), why };
        let committing = self.state.join(COMMIT).exists();
        let journal: Option<Identity> = read_json(&self.out, &self.state.join(JOURNAL))?;
        match self.role {
            Role::Whole { force: true } => {
                if committing {
                    self.roll_forward()?;
                }
                self.clear_state()?;
                self.remove_ours(copies)?;
                return self.start();
            }
            Role::Job { .. } if committing => {
                // Past the commit point: the output exists, the next whole run moves it in.
                let j = journal
                    .ok_or_else(|| refuse(Refusal::UnusableState { what: "a commit without a journal".into() }))?;
                self.identity.check_same(&j, &out, Since::Started)?;
                return Ok(Opened::Complete);
            }
            Role::Whole { force: false } if committing => self.roll_forward()?,
            _ => {}
        }
        if let Some(j) = read_json::<Identity>(&self.out, &self.state.join(JOURNAL))? {
            self.identity.check_same(&j, &out, Since::Started)?;
            if matches!(self.role, Role::Whole { .. }) {
                remove_partials(&self.state.join(FILES))?;
                remove_partials(&out)?;
            }
            self.make_dirs()?;
            return Ok(Opened::Writing(self));
        }
        if finished(&out, &self.identity)? {
            if matches!(self.role, Role::Whole { .. }) {
                std::fs::remove_dir_all(&self.state).map_err(FormatError::io(&self.state, "remove"))?;
            }
            return Ok(Opened::Complete);
        }
        let mut others = Vec::new();
        for e in std::fs::read_dir(&out).map_err(FormatError::io(&out, "read_dir"))? {
            let name = e.map_err(FormatError::io(&out, "read_dir"))?.file_name().to_string_lossy().into_owned();
            if name != STATE_DIR && !is_partial_name(&name) {
                others.push(name);
            }
        }
        if others.is_empty() {
            // Empty, or only the state of a run that stopped before it recorded its journal
            // (killed, or the disk was full): start.
            if matches!(self.role, Role::Whole { .. }) {
                self.clear_state()?;
                remove_partials(&out)?;
            }
            return self.start();
        }
        if others.iter().any(|n| n == RECORD_NAME) {
            // A record that did not match (checked above): say why.
            return Err(self.record_mismatch()?);
        }
        if others.iter().any(|n| n == MANIFEST_NAME) {
            return Err(refuse(Refusal::UnrecordedCheckpoint));
        }
        Err(refuse(Refusal::NotEmpty))
    }

    /// Why the record in OUT is not this output's (or the output was changed since).
    fn record_mismatch(&self) -> Result<FormatError> {
        let refused = |why| FormatError::Refused { path: self.out.clone(), why };
        let Some(r) = read_json::<Record>(&self.out, &self.out.join(RECORD_NAME))? else {
            return Ok(refused(Refusal::UnusableState { what: format!("{RECORD_NAME} vanished") }));
        };
        if let Err(e) = self.identity.check_same(&r.identity, &self.out, Since::Finished) {
            return Ok(e);
        }
        Ok(refused(Refusal::ChangedSince { what: changed_file(&self.out, &r).unwrap_or_default() }))
    }

    /// Records the journal and creates the state's folders: this run starts the output.
    fn start(self) -> Result<Opened> {
        self.make_dirs()?;
        let path = self.state.join(JOURNAL);
        let json = pretty_json(&self.identity, &path)?;
        match self.role {
            Role::Whole { .. } => {
                write_atomic(&path, &json)?;
            }
            Role::Job { .. } => {
                // Jobs of one array may start together: the first journal wins, the others must
                // agree with it.
                if !create_new(&path, &json)? {
                    let theirs: Option<Identity> = read_json(&self.out, &path)?;
                    if let Some(j) = theirs {
                        self.identity.check_same(&j, &self.out, Since::Started)?;
                    }
                }
            }
        }
        Ok(Opened::Writing(self))
    }

    fn make_dirs(&self) -> Result<()> {
        for d in [self.state.join(FILES), self.state.join(DONE)] {
            std::fs::create_dir_all(&d).map_err(FormatError::io(&d, "create"))?;
        }
        Ok(())
    }

    /// Removes everything from the state directory but the lock files.
    fn clear_state(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.state) else { return Ok(()) };
        for e in entries {
            let e = e.map_err(FormatError::io(&self.state, "read_dir"))?;
            if e.file_name().to_string_lossy().starts_with(LOCK) {
                continue;
            }
            let p = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(FormatError::io(&p, "remove"))?;
        }
        Ok(())
    }

    /// Removes from OUT the files a conversion writes (weights, index, config, the carried
    /// `copies`, the manifest, the record and temporary files); other files stay.
    fn remove_ours(&self, copies: &[String]) -> Result<()> {
        for e in std::fs::read_dir(&self.out).map_err(FormatError::io(&self.out, "read_dir"))? {
            let e = e.map_err(FormatError::io(&self.out, "read_dir"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            let mine = name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
                || [CONFIG, MANIFEST_NAME, RECORD_NAME].contains(&name.as_str())
                || copies.contains(&name)
                || is_partial_name(&name);
            if mine && !is_dir {
                std::fs::remove_file(e.path()).map_err(FormatError::io(e.path(), "remove"))?;
            }
        }
        Ok(())
    }

    /// Moves the files named by the commit journal into OUT (those still staged), then empties the
    /// state directory: the end of an interrupted commit.
    fn roll_forward(&self) -> Result<()> {
        let moves: Vec<String> = read_json(&self.out, &self.state.join(COMMIT))?.unwrap_or_default();
        let staging = self.state.join(FILES);
        for name in &moves {
            let from = staging.join(name);
            if std::fs::symlink_metadata(&from).is_ok() {
                let to = self.out.join(name);
                std::fs::rename(&from, &to).map_err(FormatError::io(&to, "rename"))?;
            }
        }
        sync_parent(&self.out.join(RECORD_NAME))?;
        self.clear_state()
    }

    /// The output directory.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Where output file `name` is written before the commit.
    pub fn staging(&self, name: &str) -> PathBuf {
        self.state.join(FILES).join(name)
    }

    /// The sha256 and size of output file `name` when it is complete (its marker exists and the
    /// staged file has the marked size).
    pub fn done(&self, name: &str) -> Option<(String, u64)> {
        let text = std::fs::read_to_string(self.state.join(DONE).join(name)).ok()?;
        let (h, n) = text.trim().split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        let size = std::fs::metadata(self.staging(name)).ok()?.len();
        (size == n).then(|| (h.to_owned(), n))
    }

    /// Marks a file written (into [`Self::staging`]) as complete.
    pub fn mark_done(&self, name: &str, w: &WrittenFile) -> Result<()> {
        write_atomic(&self.state.join(DONE).join(name), format!("{} {}\n", w.sha256, w.bytes).as_bytes()).map(|_| ())
    }

    /// Writes output file `name` with `data` and marks it complete.
    pub fn write_file(&self, name: &str, data: &[u8]) -> Result<WrittenFile> {
        let w = write_atomic(&self.staging(name), data)?;
        self.mark_done(name, &w)?;
        Ok(w)
    }

    /// Writes `model.safetensors.index.json` for the output files `files` (file name and its
    /// tensors), as transformers writes it, and marks it complete.
    pub fn write_index(&self, files: &[(String, Vec<PlannedTensor>)]) -> Result<WrittenFile> {
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (file, tensors) in files {
            for t in tensors {
                total += t.nbytes();
                weight_map.insert(t.name.clone(), file.clone());
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        self.write_file(INDEX_NAME, &pretty_json(&index, &self.staging(INDEX_NAME))?)
    }

    /// Copies `src` as output file `name` and marks it complete.
    pub fn copy_file(&self, src: &Path, name: &str) -> Result<WrittenFile> {
        let w = copy_atomic(src, &self.staging(name))?;
        self.mark_done(name, &w)?;
        Ok(w)
    }

    /// Commits the output: checks that the inputs are still those of the journal (`now`, stamped
    /// again at the end), writes `SHA256SUMS` and the record beside the complete files `files`,
    /// records the commit, moves everything into OUT (config.json, then the manifest, then the
    /// record, last) and removes the state directory.
    ///
    /// # Errors
    ///
    /// [`FormatError::InputChanged`] when an input changed during the run (nothing is moved: the
    /// output would mix old and new input); [`FormatError::Output`] when a file is missing (a job
    /// of the array has not finished) or this run is a job, which never commits.
    pub fn commit(self, files: &[String], now: &Identity) -> Result<()> {
        self.prepare_commit(files, now)?;
        self.roll_forward()?;
        std::fs::remove_dir_all(&self.state).map_err(FormatError::io(&self.state, "remove"))
    }

    /// Everything of [`Self::commit`] up to its point of no return: the manifest, the record and
    /// the commit journal written.
    fn prepare_commit(&self, files: &[String], now: &Identity) -> Result<()> {
        if let Role::Job { index, count } = self.role {
            return Err(FormatError::Output {
                path: self.out.clone(),
                reason: format!("job {index}/{count} cannot commit the output; run without --shard"),
            });
        }
        self.identity.check_same(now, &self.out, Since::Started)?;
        let mut moves: Vec<String> = files.iter().filter(|n| *n != CONFIG).cloned().collect();
        moves.extend(files.iter().filter(|n| *n == CONFIG).cloned());
        let mut manifest = BTreeMap::new();
        let mut record = Record { identity: self.identity.clone(), files: Vec::with_capacity(moves.len() + 1) };
        for name in &moves {
            let (sha, bytes) = self.done(name).ok_or_else(|| FormatError::Output {
                path: self.out.join(name),
                reason: "not written yet: run the job that writes it (or this command again) first".into(),
            })?;
            manifest.insert(name.clone(), sha);
            record.files.push(RecordFile { name: name.clone(), bytes });
        }
        let m = write_manifest(&self.state.join(FILES), &manifest)?;
        record.files.push(RecordFile { name: MANIFEST_NAME.into(), bytes: m.bytes });
        let record_path = self.staging(RECORD_NAME);
        write_atomic(&record_path, &pretty_json(&record, &record_path)?)?;
        moves.push(MANIFEST_NAME.into());
        moves.push(RECORD_NAME.into());
        let commit = self.state.join(COMMIT);
        write_atomic(&commit, &pretty_json(&moves, &commit)?)?;
        Ok(())
    }
}

/// True when OUT holds the finished output of `identity`, every file of its record present with
/// its size.
fn finished(out: &Path, identity: &Identity) -> Result<bool> {
    let Some(r) = read_json::<Record>(out, &out.join(RECORD_NAME))? else { return Ok(false) };
    Ok(identity.check_same(&r.identity, out, Since::Finished).is_ok() && changed_file(out, &r).is_none())
}

/// The first file of a finished output that is missing or not of its recorded size.
fn changed_file(out: &Path, r: &Record) -> Option<String> {
    r.files.iter().find_map(|f| match std::fs::metadata(out.join(&f.name)) {
        Ok(m) if m.len() == f.bytes => None,
        Ok(m) => Some(format!("{}: {} bytes, {} when finished", f.name, m.len(), f.bytes)),
        Err(_) => Some(format!("{} is missing", f.name)),
    })
}

/// Removes the state folder `state` when it holds nothing but lock files (best effort: it is
/// only tidying up).
fn remove_if_only_locks(state: &Path) {
    let Ok(entries) = std::fs::read_dir(state) else { return };
    let names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.iter().all(|n| n.starts_with(LOCK)) {
        let _ = std::fs::remove_dir_all(state);
    }
}

fn remove_partials(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries {
        let e = e.map_err(FormatError::io(dir, "read_dir"))?;
        if is_partial_name(&e.file_name().to_string_lossy()) {
            std::fs::remove_file(e.path()).map_err(FormatError::io(e.path(), "remove"))?;
        }
    }
    Ok(())
}

/// Reads a JSON file of ours; `None` when it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(out: &Path, path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| FormatError::Refused {
            path: out.to_owned(),
            why: Refusal::UnusableState {
                what: format!(
                    "{} is not a file fp8forge wrote ({e})",
                    path.strip_prefix(out).unwrap_or(path).display()
                ),
            },
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FormatError::Io { path: path.to_owned(), op: "read", source: e }),
    }
}

/// Writes `data` to `path` unless a file is there already (atomically: a temporary file linked to
/// the name, which fails when the name exists). Returns whether this call created it.
fn create_new(path: &Path, data: &[u8]) -> Result<bool> {
    let tmp = path.with_extension(format!("{}.new", std::process::id()));
    let w = write_atomic(&tmp, data)?;
    let linked = std::fs::hard_link(&w.path, path);
    let _ = std::fs::remove_file(&w.path);
    match linked {
        Ok(()) => {
            sync_parent(path)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(FormatError::Io { path: path.to_owned(), op: "link", source: e }),
    }
}

/// Refuses an output directory `out` that is the input directory `root`, lies inside it, or holds
/// one of the input `files` (whatever the spelling: symbolic links, `..`, trailing slashes): a
/// conversion there would replace or delete its own input.
pub fn check_apart(root: &Path, files: &[PathBuf], out: &Path) -> Result<()> {
    let refuse = |reason: String| FormatError::Output { path: out.to_owned(), reason };
    let out_real = resolve(out)?;
    let root_real = std::fs::canonicalize(root).map_err(FormatError::io(root, "canonicalize"))?;
    if out_real == root_real {
        return Err(refuse(format!(
            "is the input directory {} (writing there would destroy the input); choose another output directory",
            root.display()
        )));
    }
    if out_real.starts_with(&root_real) {
        return Err(refuse(format!(
            "lies inside the input directory {}; choose an output directory outside it",
            root.display()
        )));
    }
    for f in files {
        if let Ok(real) = std::fs::canonicalize(f)
            && real.parent() == Some(out_real.as_path())
        {
            return Err(refuse(format!(
                "holds the input file {} (writing there could replace it); choose another output directory",
                f.display()
            )));
        }
    }
    Ok(())
}

/// The absolute, symlink-free form of `path`, which need not exist: its longest existing prefix
/// resolved by the file system, the rest applied by name.
fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_err(FormatError::io(path, "getcwd"))?.join(path)
    };
    let parts: Vec<Component<'_>> = abs.components().collect();
    for k in (0..=parts.len()).rev() {
        let prefix: PathBuf = parts[..k].iter().collect();
        let Ok(mut real) = std::fs::canonicalize(if k == 0 { Path::new("/") } else { &prefix }) else { continue };
        for c in &parts[k..] {
            match c {
                Component::ParentDir => {
                    real.pop();
                }
                Component::Normal(n) => real.push(n),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return Ok(real);
    }
    Ok(abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(root: &Path, plan: &str) -> Identity {
        std::fs::write(root.join("a.safetensors"), b"input").expect("write input");
        Identity::stamp(plan.into(), root, &["a.safetensors".into()]).expect("stamp")
    }

    fn open(out: &Path, id: &Identity, role: Role) -> Result<Opened> {
        OutputDir::open(out, id.clone(), role, &[])
    }

    fn writing(o: Result<Opened>) -> OutputDir {
        match o.expect("open") {
            Opened::Writing(d) => d,
            Opened::Complete => panic!("expected an unfinished output"),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn nothing_is_under_a_final_name_before_the_commit_and_everything_after() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        std::fs::create_dir(&input).expect("mkdir");
        let id = identity(&input, "p1");
        let w = writing(open(&out, &id, Role::Whole { force: false }));
        w.write_file("model.safetensors", b"weights").expect("shard");
        w.write_file(CONFIG, b"{}").expect("config");
        assert_eq!(names(&out), [STATE_DIR], "final names before the commit");
        w.commit(&[CONFIG.into(), "model.safetensors".into()], &id).expect("commit");
        assert_eq!(names(&out), [RECORD_NAME, MANIFEST_NAME, CONFIG, "model.safetensors"]);
        // A second run of the same identity finds it finished and changes nothing.
        assert!(matches!(open(&out, &id, Role::Whole { force: false }), Ok(Opened::Complete)));
        assert!(matches!(open(&out, &id, Role::Job { index: 0, count: 2 }), Ok(Opened::Complete)));
        assert_eq!(names(&out), [RECORD_NAME, MANIFEST_NAME, CONFIG, "model.safetensors"]);
    }

    #[test]
    fn an_interrupted_commit_is_finished_by_the_next_run() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        std::fs::create_dir(&input).expect("mkdir");
        let id = identity(&input, "p1");
        let w = writing(open(&out, &id, Role::Whole { force: false }));
        w.write_file("model.safetensors", b"weights").expect("shard");
        w.write_file(CONFIG, b"{}").expect("config");
        // Past the point of no return, killed after the first rename.
        w.prepare_commit(&[CONFIG.into(), "model.safetensors".into()], &id).expect("prepare");
        std::fs::rename(w.staging("model.safetensors"), out.join("model.safetensors")).expect("move");
        drop(w);
        // A job has nothing to do; the next whole run moves the rest in and finds it finished.
        assert!(matches!(open(&out, &id, Role::Job { index: 1, count: 2 }), Ok(Opened::Complete)));
        assert!(matches!(open(&out, &id, Role::Whole { force: false }), Ok(Opened::Complete)));
        assert_eq!(names(&out), [RECORD_NAME, MANIFEST_NAME, CONFIG, "model.safetensors"]);
    }

    #[test]
    fn a_changed_input_or_another_plan_is_refused_and_force_starts_over() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        std::fs::create_dir(&input).expect("mkdir");
        let id = identity(&input, "p1");
        let w = writing(open(&out, &id, Role::Whole { force: false }));
        w.write_file("model.safetensors", b"weights").expect("shard");
        drop(w);
        let other = Identity { plan: "p2".into(), ..id.clone() };
        let e = open(&out, &other, Role::Whole { force: false }).err().expect("other plan refused").to_string();
        assert!(e.contains("other input or options"), "{e}");
        std::fs::write(input.join("a.safetensors"), b"input, longer").expect("rewrite input");
        let now = Identity::stamp("p1".into(), &input, &["a.safetensors".into()]).expect("stamp");
        let e = open(&out, &now, Role::Whole { force: false }).err().expect("changed input refused");
        assert!(matches!(e, FormatError::InputChanged { .. }), "{e}");
        assert!(e.to_string().contains("a.safetensors") && e.to_string().contains("size 5 -> 13"), "{e}");
        let w = writing(open(&out, &now, Role::Whole { force: true }));
        assert!(w.done("model.safetensors").is_none(), "--force kept the old file");
    }

    #[test]
    fn force_cannot_take_an_output_from_a_running_job() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        std::fs::create_dir(&input).expect("mkdir");
        let id = identity(&input, "p1");
        let job = writing(open(&out, &id, Role::Job { index: 0, count: 2 }));
        job.write_file("model.safetensors", b"weights").expect("shard");
        let e = open(&out, &id, Role::Whole { force: true }).err().expect("refused").to_string();
        assert!(e.contains("another fp8forge run"), "{e}");
        assert!(job.done("model.safetensors").is_some(), "the job's work was touched");
    }

    #[test]
    fn output_resolving_to_the_input_is_refused_whatever_the_spelling() {
        let d = tempfile::tempdir().expect("tempdir");
        let input = d.path().join("in");
        std::fs::create_dir(&input).expect("mkdir");
        let file = input.join("model.safetensors");
        std::fs::write(&file, b"x").expect("write");
        std::os::unix::fs::symlink(&input, d.path().join("link")).expect("symlink");
        let files = [file.clone()];
        for out in [
            input.clone(),
            d.path().join("in/"),
            d.path().join("in/../in"),
            d.path().join("link"),
            d.path().join("link/sub/.."),
            input.join("fp8"),
            d.path().join("nonexistent/../in/deeper/fp8"),
        ] {
            assert!(check_apart(&input, &files, &out).is_err(), "{} accepted", out.display());
        }
        check_apart(&input, &files, &d.path().join("out")).expect("a sibling is fine");
        check_apart(&input, &files, &d.path().join("in-fp8")).expect("a name with the input's as prefix is fine");
    }
}

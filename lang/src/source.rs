//! The source database: every file the front end sees, by id, with line/column lookup.

/// Index of a file in a [`SourceDb`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A byte range inside one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start: start as u32, end: end as u32 }
    }
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// One source file: its display name, its module path (`std.loss`, or the file stem for user
/// files) and its text.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
    line_starts: Vec<u32>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> SourceFile {
        let text = text.into();
        let mut line_starts = vec![0u32];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i as u32 + 1);
            }
        }
        SourceFile { name: name.into(), text, line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: u32) -> (usize, usize) {
        let offset = offset.min(self.text.len() as u32);
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line] as usize;
        let mut end = offset as usize;
        while end > start && !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let col = self.text[start..end].chars().count() + 1;
        (line + 1, col)
    }

    /// The text of 1-based line `line`, without its newline.
    pub fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts.get(line.wrapping_sub(1)).copied().unwrap_or(0) as usize;
        let end = self.line_starts.get(line).map(|e| *e as usize).unwrap_or(self.text.len());
        self.text[start..end].trim_end_matches(['\n', '\r'])
    }

    pub fn line_count(&self) -> usize {
        self.line_starts.len()
    }

    /// Byte offset of the start of 1-based line `line`.
    pub fn line_start(&self, line: usize) -> usize {
        self.line_starts.get(line.wrapping_sub(1)).copied().unwrap_or(0) as usize
    }
}

/// All files known to one front-end run. The core never reads the file system: callers
/// (the CLI, the LSP, tests) add files, and provide a [`ModuleLoader`] to find imports.
#[derive(Default, Debug, Clone)]
pub struct SourceDb {
    files: Vec<SourceFile>,
}

impl SourceDb {
    pub fn new() -> SourceDb {
        SourceDb::default()
    }
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        self.files.push(SourceFile::new(name, text));
        FileId(self.files.len() as u32 - 1)
    }
    pub fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }
    pub fn files(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files.iter().enumerate().map(|(i, f)| (FileId(i as u32), f))
    }
    pub fn find(&self, name: &str) -> Option<FileId> {
        self.files.iter().position(|f| f.name == name).map(|i| FileId(i as u32))
    }
}

/// Where module sources come from. `std.*` modules are served from the embedded standard
/// library; sibling modules from the importing file's directory. Implemented by the CLI (file
/// system) and by tests (in memory).
pub trait ModuleLoader {
    /// Returns `(display name, text)` for the module at `path` (`["std", "loss"]`) imported
    /// from the file named `from`, or `None` if it does not exist.
    fn load(&self, path: &[String], from: &str) -> Option<(String, String)>;

    /// The module paths this loader can always serve (the standard library), for
    /// suggestions such as "`cross_entropy` is in `std.loss`".
    fn known_modules(&self) -> Vec<String> {
        vec![]
    }
}

/// A loader over a fixed set of `(module path, display name, text)` triples; used by tests
/// and by the embedded standard library.
#[derive(Default, Clone)]
pub struct MemoryLoader {
    pub modules: Vec<(String, String, String)>,
}

impl MemoryLoader {
    pub fn with(mut self, module: &str, name: &str, text: &str) -> Self {
        self.modules.push((module.to_string(), name.to_string(), text.to_string()));
        self
    }
}

impl ModuleLoader for MemoryLoader {
    fn load(&self, path: &[String], _from: &str) -> Option<(String, String)> {
        let joined = path.join(".");
        self.modules.iter().find(|(m, _, _)| *m == joined).map(|(_, n, t)| (n.clone(), t.clone()))
    }
    fn known_modules(&self) -> Vec<String> {
        self.modules.iter().filter(|m| m.0.starts_with("std.")).map(|m| m.0.clone()).collect()
    }
}

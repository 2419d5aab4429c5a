//! Corpus files: which files the inputs name, and the documents each file holds, streamed.
//!
//! A document is a whole text file, one JSON Lines record or one Parquet row. Records and
//! rows hold their text in a field (`text` unless another is named); null, empty and
//! whitespace-only texts are skipped and counted.
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The field (JSON Lines) or column (Parquet) documents are read from unless another is named.
pub const DEFAULT_FIELD: &str = "text";

/// The file names `prepare` reads, for messages and `--help`.
pub const ACCEPTED_FORMATS: &str = ".parquet; .jsonl or .ndjson (JSON Lines), optionally .gz \
     or .zst (.json.gz and .json.zst are read as JSON Lines too); .txt, .md or .text, \
     optionally .gz or .zst (one document per file)";

/// How a file stores its documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The whole file is one document.
    Text,
    /// One JSON object per line; the document is one field of it.
    Jsonl,
    /// One row per document; the document is one string or binary column.
    Parquet,
}

/// The stream compression around a text or JSON Lines file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain bytes.
    None,
    /// gzip (`.gz`), several members allowed.
    Gzip,
    /// Zstandard (`.zst`, `.zstd`), several frames allowed.
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "file",
            Compression::Gzip => "gzip stream",
            Compression::Zstd => "zstd stream",
        }
    }
}

/// One corpus file and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusFile {
    /// Where it is (for hub datasets, the file in the local Hugging Face cache).
    pub path: PathBuf,
    /// How it stores documents.
    pub format: Format,
    /// Compression around it (always `None` for Parquet, which compresses inside).
    pub compression: Compression,
}

/// What reading one file found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStats {
    /// Documents with text.
    pub documents: u64,
    /// Null, empty or whitespace-only texts, skipped.
    pub empty: u64,
    /// Invalid UTF-8 sequences replaced by U+FFFD.
    pub replaced_invalid_utf8: u64,
    /// Bytes of document text (after decoding).
    pub text_bytes: u64,
}

impl std::ops::AddAssign for FileStats {
    fn add_assign(&mut self, o: Self) {
        self.documents += o.documents;
        self.empty += o.empty;
        self.replaced_invalid_utf8 += o.replaced_invalid_utf8;
        self.text_bytes += o.text_bytes;
    }
}

impl CorpusFile {
    /// The file at `path` if its name is of a known format.
    pub fn new(path: PathBuf) -> Option<Self> {
        let (format, compression) = format_of(&path)?;
        Some(Self {
            path,
            format,
            compression,
        })
    }

    /// Calls `f` with the text of every non-empty document, in file order, holding at most
    /// one document (plus one Parquet page or one stream buffer) in memory.
    pub fn for_each_document(
        &self,
        field: &str,
        mut f: impl FnMut(String) -> Result<()>,
    ) -> Result<FileStats> {
        let mut stats = FileStats::default();
        let mut emit = |text: Option<Cow<'_, str>>, stats: &mut FileStats| match text {
            Some(t) if !t.trim().is_empty() => {
                stats.documents += 1;
                stats.text_bytes += t.len() as u64;
                f(t.into_owned())
            }
            _ => {
                stats.empty += 1;
                Ok(())
            }
        };
        match self.format {
            Format::Text => {
                let mut bytes = Vec::new();
                self.open_stream()?
                    .read_to_end(&mut bytes)
                    .map_err(|e| self.stream_error(e))?;
                let text = match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => {
                        lossy_utf8(e.as_bytes(), &mut stats.replaced_invalid_utf8).into_owned()
                    }
                };
                emit(Some(Cow::Owned(text)), &mut stats)?;
            }
            Format::Jsonl => {
                let mut stream = self.open_stream()?;
                let mut line = Vec::new();
                let mut n = 0u64;
                loop {
                    line.clear();
                    if stream
                        .read_until(b'\n', &mut line)
                        .map_err(|e| self.stream_error(e))?
                        == 0
                    {
                        break;
                    }
                    n += 1;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let text = lossy_utf8(&line, &mut stats.replaced_invalid_utf8);
                    let doc = json_field(&text, field)
                        .map_err(|e| Error::invalid(&self.path, format!("line {n}: {e}")))?;
                    emit(doc.map(Cow::Owned), &mut stats)?;
                }
            }
            Format::Parquet => parquet_documents(&self.path, field, |bytes| {
                let text = bytes.map(|b| lossy_utf8(b, &mut stats.replaced_invalid_utf8));
                emit(text, &mut stats)
            })?,
        }
        Ok(stats)
    }

    fn open_stream(&self) -> Result<Box<dyn BufRead>> {
        let file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(match self.compression {
            Compression::None => Box::new(BufReader::with_capacity(1 << 16, file)),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                1 << 16,
                flate2::read::MultiGzDecoder::new(BufReader::new(file)),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                1 << 16,
                zstd::stream::read::Decoder::new(file).map_err(|e| self.stream_error(e))?,
            )),
        })
    }

    fn stream_error(&self, e: std::io::Error) -> Error {
        Error::invalid(
            &self.path,
            format!("reading the {}: {e}", self.compression.name()),
        )
    }
}

fn format_of(path: &Path) -> Option<(Format, Compression)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name
        .strip_suffix(".zst")
        .or_else(|| name.strip_suffix(".zstd"))
    {
        (s, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    let format = match (stem.rsplit_once('.')?.1, compression) {
        ("jsonl" | "ndjson", _) => Format::Jsonl,
        // Compressed `.json` corpora (C4, The Pile) are JSON Lines; a plain `.json` is
        // usually one JSON document (metadata), so it is not taken.
        ("json", Compression::Gzip | Compression::Zstd) => Format::Jsonl,
        ("txt" | "md" | "text", _) => Format::Text,
        ("parquet", Compression::None) => Format::Parquet,
        _ => return None,
    };
    Some((format, compression))
}

/// Decodes UTF-8, replacing each invalid sequence by U+FFFD and counting it into `replaced`.
fn lossy_utf8<'a>(bytes: &'a [u8], replaced: &mut u64) -> Cow<'a, str> {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(bytes.len() + 2);
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            *replaced += 1;
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    Cow::Owned(out)
}

/// The string `field` of one JSON Lines record: `Some(text)`, or `None` for `null`.
fn json_field(line: &str, field: &str) -> std::result::Result<Option<String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(mut record) = value else {
        return Err("not a JSON object".into());
    };
    match record.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Null) => Ok(None),
        Some(other) => Err(format!(
            "field \"{field}\" is not a string but {}",
            json_type(&other)
        )),
        None => {
            let keys: Vec<&str> = record.keys().map(String::as_str).collect();
            Err(format!(
                "no field \"{field}\" (fields: {}); pick another with --field",
                keys.join(", ")
            ))
        }
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Rows read per call of the column reader.
const PARQUET_BATCH_ROWS: usize = 1024;

/// Calls `f` with the bytes of column `field` of every row (`None` for null), row group by
/// row group and page by page: memory holds one page and one batch of rows, never the file.
fn parquet_documents(
    path: &Path,
    field: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Result<()>,
) -> Result<()> {
    use parquet::basic::Type as PhysicalType;
    use parquet::column::reader::ColumnReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let bad = |what: String| {
        // The codecs left out of this build (brotli, lz4) fail only when a page is read.
        let hint = if what.contains("Disabled feature at compile time") {
            "; this build reads Parquet pages that are uncompressed or snappy, zstd or gzip \
             compressed: rewrite the file with one of those (e.g. pyarrow's compression=\"zstd\")"
        } else {
            ""
        };
        Error::invalid(path, format!("{what}{hint}"))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let top = schema.root_schema().get_fields();
    let Some(column) = top.iter().find(|t| t.name() == field) else {
        let names: Vec<&str> = top.iter().map(|t| t.name()).collect();
        return Err(bad(format!(
            "no column \"{field}\" (columns: {}); pick another with --field",
            names.join(", ")
        )));
    };
    if column.is_group() || column.get_physical_type() != PhysicalType::BYTE_ARRAY {
        let kind = if column.is_group() {
            "a list or struct".to_string()
        } else {
            format!("of type {}", column.get_physical_type())
        };
        return Err(bad(format!(
            "column \"{field}\" is {kind}, not text (a string or binary column)"
        )));
    }
    let index = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().parts() == [field])
        .ok_or_else(|| bad(format!("column \"{field}\" has no leaf in the schema")))?;
    let max_def = schema.column(index).max_def_level();

    let mut values = Vec::new();
    let mut defs = Vec::new();
    for g in 0..reader.num_row_groups() {
        let group = reader
            .get_row_group(g)
            .map_err(|e| bad(format!("row group {g}: {e}")))?;
        let expected = group.metadata().num_rows();
        let ColumnReader::ByteArrayColumnReader(mut column) = group
            .get_column_reader(index)
            .map_err(|e| bad(format!("row group {g}, column \"{field}\": {e}")))?
        else {
            return Err(bad(format!(
                "column \"{field}\" changed type in row group {g}"
            )));
        };
        let mut rows = 0i64;
        loop {
            values.clear();
            defs.clear();
            let (records, _, _) = column
                .read_records(PARQUET_BATCH_ROWS, Some(&mut defs), None, &mut values)
                .map_err(|e| bad(format!("row group {g}, column \"{field}\": {e}")))?;
            if records == 0 {
                break;
            }
            rows += records as i64;
            if max_def == 0 {
                for v in &values {
                    f(Some(v.data()))?;
                }
            } else {
                let mut next = values.iter();
                for &d in &defs {
                    if d == max_def {
                        let v = next.next().ok_or_else(|| {
                            bad(format!("row group {g}: fewer values than levels"))
                        })?;
                        f(Some(v.data()))?;
                    } else {
                        f(None)?;
                    }
                }
            }
        }
        if rows != expected {
            return Err(bad(format!(
                "row group {g}: column \"{field}\" holds {rows} rows, the row group {expected}: \
                 the file is truncated or corrupt"
            )));
        }
    }
    Ok(())
}

/// The files a list of inputs names, in preparation order, and the field documents are
/// read from.
///
/// An input is a file, a folder (walked recursively in name order, taking the files of known
/// formats), a shell glob (`data/**/*.parquet`, matches in name order) or a Hugging Face
/// dataset `hf://datasets/OWNER/NAME[@REVISION]/PATH_GLOB`, downloaded into the hub cache.
#[derive(Debug, Clone)]
pub struct Corpus {
    files: Vec<CorpusFile>,
    field: String,
}

impl Corpus {
    /// Resolves `inputs`; errors name the input that matched nothing, a file of unknown
    /// format, or a file listed twice.
    pub fn resolve(inputs: &[PathBuf], field: &str) -> Result<Self> {
        if inputs.is_empty() {
            return Err(Error::Other(
                "no input files, folders, globs or hf:// datasets given".into(),
            ));
        }
        if field.is_empty() {
            return Err(Error::Other("the text field name is empty".into()));
        }
        let mut files: Vec<CorpusFile> = Vec::new();
        let mut first_seen: HashMap<PathBuf, &Path> = HashMap::new();
        for input in inputs {
            for path in expand(input)? {
                let key = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
                if let Some(earlier) = first_seen.insert(key, input) {
                    return Err(Error::invalid(
                        &path,
                        format!(
                            "named twice (by {} and {}): its documents would be trained on twice",
                            earlier.display(),
                            input.display()
                        ),
                    ));
                }
                let file = CorpusFile::new(path.clone()).ok_or_else(|| {
                    Error::invalid(
                        &path,
                        format!("unknown file type: expected {ACCEPTED_FORMATS}"),
                    )
                })?;
                files.push(file);
            }
        }
        Ok(Self {
            files,
            field: field.to_string(),
        })
    }

    /// The files, in preparation order.
    pub fn files(&self) -> &[CorpusFile] {
        &self.files
    }

    /// The JSON Lines field / Parquet column documents are read from.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Hex sha256 of every file, hashed in parallel.
    pub fn sha256s(&self) -> Result<Vec<String>> {
        self.files
            .par_iter()
            .map(|f| crate::file_sha256(&f.path))
            .collect()
    }

    /// Every non-empty document, in memory (e.g. to train a tokenizer on a small corpus).
    pub fn read_documents(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for f in &self.files {
            f.for_each_document(&self.field, |d| {
                out.push(d);
                Ok(())
            })?;
        }
        Ok(out)
    }
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The files one input names (folders walked, globs expanded, hub datasets downloaded).
fn expand(input: &Path) -> Result<Vec<PathBuf>> {
    let text = input.to_str().unwrap_or_default();
    if text.starts_with(crate::hub::SCHEME) {
        return crate::hub::resolve(text);
    }
    if input.is_dir() {
        let mut out = Vec::new();
        walk(input, &mut out)?;
        if out.is_empty() {
            return Err(Error::invalid(
                input,
                format!("folder holds no corpus file (expected {ACCEPTED_FORMATS})"),
            ));
        }
        return Ok(out);
    }
    if input.exists() {
        return Ok(vec![input.to_path_buf()]);
    }
    if !has_glob_chars(text) {
        return Err(Error::invalid(input, "no such file or folder"));
    }
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let paths = glob::glob_with(text, options)
        .map_err(|e| Error::invalid(input, format!("not a valid glob pattern: {e}")))?;
    let mut matched = Vec::new();
    for p in paths {
        let p = p.map_err(|e| Error::io(e.path().to_path_buf(), e.into()))?;
        if p.is_dir() {
            walk(&p, &mut matched)?;
        } else {
            matched.push(p);
        }
    }
    if matched.is_empty() {
        return Err(Error::invalid(input, "the glob pattern matches no file"));
    }
    matched.sort();
    Ok(matched)
}

/// Files of known formats under `dir`, recursively, in name order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        entries.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if format_of(&p).is_some() {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_name() {
        let f = |n: &str| format_of(Path::new(n));
        assert_eq!(f("a.parquet"), Some((Format::Parquet, Compression::None)));
        assert_eq!(f("a.PARQUET"), Some((Format::Parquet, Compression::None)));
        assert_eq!(f("a.parquet.gz"), None);
        assert_eq!(f("a.jsonl.zst"), Some((Format::Jsonl, Compression::Zstd)));
        assert_eq!(f("a.ndjson.zstd"), Some((Format::Jsonl, Compression::Zstd)));
        assert_eq!(f("c4.json.gz"), Some((Format::Jsonl, Compression::Gzip)));
        assert_eq!(f("meta.json"), None);
        assert_eq!(f("a.txt.zst"), Some((Format::Text, Compression::Zstd)));
        assert_eq!(f("a.md"), Some((Format::Text, Compression::None)));
        assert_eq!(f("a.zst"), None);
        assert_eq!(f("archive.tar.gz"), None);
    }

    #[test]
    fn lossy_counts_each_invalid_sequence() {
        let mut n = 0;
        assert_eq!(lossy_utf8(b"ok", &mut n), "ok");
        assert_eq!(n, 0);
        assert_eq!(lossy_utf8(b"a\xffb\xe2\x82", &mut n), "a\u{fffd}b\u{fffd}");
        assert_eq!(n, 2);
    }

    #[test]
    fn json_field_cases() {
        assert_eq!(
            json_field(r#"{"text": "hi"}"#, "text"),
            Ok(Some("hi".into()))
        );
        assert_eq!(json_field(r#"{"text": null}"#, "text"), Ok(None));
        assert_eq!(json_field(r#"{"body": "x"}"#, "body"), Ok(Some("x".into())));
        let e = json_field(r#"{"body": "x", "id": 1}"#, "text").unwrap_err();
        assert!(
            e.contains("no field \"text\"") && e.contains("body, id"),
            "{e}"
        );
        let e = json_field(r#"{"text": 3}"#, "text").unwrap_err();
        assert!(e.contains("a number"), "{e}");
        assert!(json_field("[1]", "text").unwrap_err().contains("object"));
        assert!(json_field("{", "text").unwrap_err().contains("not JSON"));
    }
}

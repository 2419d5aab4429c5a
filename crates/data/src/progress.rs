//! The one progress-bar style of every long stage (tokenizing, labelling, training).
use indicatif::{ProgressBar, ProgressStyle};

fn styled(len: u64, prefix: &str, counter: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:30}}] {counter} {{msg}} eta {{eta}}"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// A bar over `len` items (steps, windows) named `prefix`; `set_message` adds live figures.
/// indicatif hides it when stderr is not a terminal.
pub fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    styled(len, prefix, "{pos}/{len} ({per_sec})")
}

/// The same bar counting bytes.
pub fn progress_bar_bytes(len: u64, prefix: &str) -> ProgressBar {
    styled(len, prefix, "{bytes}/{total_bytes} ({bytes_per_sec})")
}

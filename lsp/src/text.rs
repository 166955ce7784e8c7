//! Positions: LSP (line, UTF-16 column) to and from byte offsets.

/// The byte offset of an LSP position; positions past a line's end clamp to it, positions
/// past the end of the text clamp to the end.
pub fn offset(text: &str, line: u32, character: u32) -> usize {
    let mut start = 0usize;
    for _ in 0..line {
        match text[start..].find('\n') {
            Some(i) => start += i + 1,
            None => return text.len(),
        }
    }
    let end = text[start..].find('\n').map(|i| start + i).unwrap_or(text.len());
    let mut units = 0u32;
    for (i, ch) in text[start..end].char_indices() {
        if units >= character {
            return start + i;
        }
        units += ch.len_utf16() as u32;
    }
    end
}

/// The LSP position of a byte offset (clamped to the text, and to a char boundary).
pub fn position(text: &str, offset: usize) -> (u32, u32) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() as u32;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let character: u32 = text[line_start..offset].chars().map(|c| c.len_utf16() as u32).sum();
    (line, character)
}

/// The identifier (or dotted path) around a byte offset, with its byte range.
pub fn word_at(text: &str, offset: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let is_id = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut start = offset.min(text.len());
    while start > 0 && is_id(bytes[start - 1]) {
        start -= 1;
    }
    let mut end = offset.min(text.len());
    while end < bytes.len() && is_id(bytes[end]) {
        end += 1;
    }
    if start == end {
        None
    } else {
        Some((start, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_positions() {
        let text = "// ünïcode 😀 comment\nlet x = 1\n";
        // The emoji is two UTF-16 units and four bytes.
        let o = offset(text, 0, 13);
        assert_eq!(&text[o..o + 1], " ");
        assert_eq!(position(text, o), (0, 13));
        assert_eq!(offset(text, 1, 4), text.find("x =").unwrap());
        assert_eq!(offset(text, 9, 0), text.len());
        assert_eq!(offset(text, 0, 999), text.find('\n').unwrap());
        assert_eq!(position(text, 10_000), position(text, text.len()));
    }
}

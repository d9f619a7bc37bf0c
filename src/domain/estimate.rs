//! Token estimates for a request before it is sent.
//!
//! Input tokens are estimated from the text the request carries (about four
//! bytes of English per token, plus the chat format's per-message overhead).
//! Expected output tokens come from the request's `max_tokens`, falling back
//! to a default. Estimates only decide routing and rate-limit accounting;
//! every cost that is *charged* uses the provider's reported `usage`.

/// Bytes of text per token for the estimate; OpenAI quotes ~4 for English.
const BYTES_PER_TOKEN: usize = 4;
/// Tokens the chat format adds per message (role, separators).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Expected output when a chat request sets no `max_tokens`.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 256;

/// Estimated tokens of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenEstimate {
    pub input: u64,
    pub output: u64,
}

/// Estimated input tokens of `text_bytes` bytes of text in `messages` chat messages.
/// Saturating: the caller bounds the result ([`super::bounds::MAX_INPUT_TOKENS`]).
pub fn input_tokens(text_bytes: usize, messages: usize) -> u64 {
    (text_bytes.div_ceil(BYTES_PER_TOKEN) as u64)
        .saturating_add(TOKENS_PER_MESSAGE.saturating_mul(messages as u64))
        .saturating_add(if messages > 0 { 3 } else { 0 })
}

/// Expected output tokens of a chat request with the given `max_tokens`:
/// half the cap (requests rarely use all of it), at least 1.
pub fn expected_output_tokens(max_tokens: Option<u64>) -> u64 {
    match max_tokens {
        Some(cap) => (cap / 2).max(1),
        None => DEFAULT_OUTPUT_TOKENS,
    }
}

/// Expected output tokens of a chat request asking for `n` choices (each
/// is generated, and billed, separately). Saturating.
pub fn expected_output_tokens_n(max_tokens: Option<u64>, n: u64) -> u64 {
    expected_output_tokens(max_tokens).saturating_mul(n.max(1))
}

/// How many size bins [`size_bin`] has.
pub const SIZE_BINS: i64 = 8;

/// The size bin of a job expecting `output_tokens`: bins grow by 4× (bin
/// `b ≥ 1` holds `[4^(b-1), 4^b)`: 1–3, 4–15, 16–63, 64–255, 256–1023,
/// 1024–4095 tokens), the last open-ended from 4096. Jobs of one route and
/// deadline are interchangeable for planning only within a bin: a
/// rate-limited cheap provider is worth most to the longest jobs, so the
/// planner must not average them with the short ones (issue 10). 4× rather
/// than 2×: every bin is another group in the LP, and jobs within 4× of
/// each other rarely change where a plan sends them. The queue stores each
/// job's bin (`jobs.size_bin`, indexed by `jobs_due`), so a dispatch pass
/// reads a group's jobs along the index.
pub fn size_bin(output_tokens: u64) -> i64 {
    let bits = (u64::BITS - output_tokens.leading_zeros()) as i64;
    ((bits + 1) / 2).min(SIZE_BINS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_bins_grow_by_four_and_the_last_is_open_ended() {
        assert_eq!(size_bin(0), 0);
        assert_eq!((size_bin(1), size_bin(3), size_bin(4)), (1, 1, 2));
        assert_eq!((size_bin(15), size_bin(16)), (2, 3));
        assert_eq!((size_bin(63), size_bin(64), size_bin(255)), (3, 4, 4));
        assert_eq!((size_bin(1023), size_bin(1024), size_bin(4095)), (5, 6, 6));
        assert_eq!(size_bin(4096), SIZE_BINS - 1);
        assert_eq!(size_bin(u64::MAX), SIZE_BINS - 1);
    }

    #[test]
    fn estimates_are_in_the_right_range() {
        // "Hello, how are you?" is 6 tokens in cl100k; 1 message adds 4 + 3.
        let t = input_tokens("Hello, how are you?".len(), 1);
        assert!((10..=15).contains(&t), "{t}");
        assert_eq!(input_tokens(0, 0), 0);
        assert_eq!(expected_output_tokens(Some(64)), 32);
        assert_eq!(expected_output_tokens(Some(1)), 1);
        assert_eq!(expected_output_tokens(None), DEFAULT_OUTPUT_TOKENS);
        assert_eq!(expected_output_tokens_n(Some(64), 3), 96);
        assert_eq!(expected_output_tokens_n(Some(u64::MAX), u64::MAX), u64::MAX);
        assert_eq!(input_tokens(usize::MAX, usize::MAX), u64::MAX);
    }
}

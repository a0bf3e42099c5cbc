//! Caps on every client-controlled size (DESIGN §7): nothing a client sends allocates without one.

/// Per-request limits, checked before any work is queued.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens: u32,
    /// `max_new_tokens` when the request leaves it 0 (clipped to the context that remains).
    pub default_max_new_tokens: u32,
    /// Bytes of prompt text, or of all chat messages together.
    pub max_prompt_bytes: usize,
    /// Chat messages in one request.
    pub max_messages: usize,
    /// Stop strings in one request.
    pub max_stop_strings: usize,
    /// Bytes of one stop string.
    pub max_stop_bytes: usize,
    /// Stop token ids in one request.
    pub max_stop_token_ids: usize,
    /// Bytes of a client-chosen request id.
    pub max_request_id_bytes: usize,
    /// DRY sequence breakers in one request (each capped like a stop string).
    pub max_dry_breakers: usize,
    /// Inputs of one `Embed` request.
    pub max_embed_inputs: usize,
    /// Bytes of all texts of one `Embed` request together.
    pub max_embed_bytes: usize,
    /// Whether clients may load and unload LoRA adapters (`LoadAdapter`, `UnloadAdapter`): a
    /// loaded adapter's directory is read on every worker, so this is the operator's choice
    /// (`--allow-adapter-loading`), off by default.
    pub allow_adapter_loading: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_new_tokens: 8192,
            default_max_new_tokens: 256,
            max_prompt_bytes: 1 << 20,
            max_messages: 1024,
            max_stop_strings: 16,
            max_stop_bytes: 256,
            max_stop_token_ids: 64,
            max_request_id_bytes: 128,
            max_dry_breakers: 16,
            max_embed_inputs: 256,
            max_embed_bytes: 1 << 20,
            allow_adapter_loading: false,
        }
    }
}

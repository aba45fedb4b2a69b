"""Row -> prompt: the chat messages of a row (messages), the prompt's token ids under the
too-long policy (builder), the model's tokenizer (tokenizer), the row's SamplingParams
(request_params, seeds) and, on the way out, a completion's reasoning section (reasoning)."""

"""Official chat templates for tokenizers that arrive without one (the offline GGUF Gemma's).

Set once on the tokenizer and saved with it, so training and inference render through the same template.
"""

# Google's Gemma 3 template (as shipped in the Gemma 3 tokenizer_config.json): BOS, then
# "<start_of_turn>{user|model}\n{content, trimmed}<end_of_turn>\n" per turn; the assistant role is rendered as
# "model"; a leading system message is folded into the first user turn followed by a blank line; roles must
# alternate; content may be a string or a list of {"type": "text"|"image"} items (images become <start_of_image>);
# add_generation_prompt opens a model turn. Every tag trims its surrounding whitespace ({%- -%}), so the layout
# below renders nothing of its own; '\n' inside the Jinja string literals is Jinja's escape, hence the raw string.
GEMMA_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

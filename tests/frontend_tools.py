"""Tool definitions as a chat frontend sends them on every browser chat (36 built-ins, no tool_choice)."""

from __future__ import annotations

from typing import Any

_TOOLS: list[tuple[str, str, dict[str, str]]] = [
    ("search_web", "Search the web and return the top results", {"query": "string", "count": "integer"}),
    ("fetch_url", "Fetch a web page and return its text", {"url": "string"}),
    ("get_current_time", "The current date and time in a time zone", {"timezone": "string"}),
    ("get_weather", "Current weather for a city", {"city": "string", "unit": "string"}),
    ("calculator", "Evaluate an arithmetic expression", {"expression": "string"}),
    ("run_python", "Run Python code in a sandbox and return its output", {"code": "string"}),
    ("search_knowledge", "Search the user's knowledge bases", {"query": "string", "collection": "string"}),
    ("query_notes", "Search the user's notes", {"query": "string"}),
    ("create_note", "Create a note", {"title": "string", "content": "string"}),
    ("update_note", "Replace a note's content", {"note_id": "string", "content": "string"}),
    ("list_chats", "List the user's recent chats", {"limit": "integer"}),
    ("search_chats", "Search the user's chat history", {"query": "string"}),
    ("get_chat", "Read one chat by id", {"chat_id": "string"}),
    ("generate_image", "Generate an image from a prompt", {"prompt": "string", "size": "string"}),
    ("edit_image", "Edit an image with an instruction", {"image_id": "string", "instruction": "string"}),
    ("describe_image", "Describe an uploaded image", {"image_id": "string"}),
    ("transcribe_audio", "Transcribe an uploaded audio file", {"file_id": "string"}),
    ("text_to_speech", "Read a text aloud", {"text": "string", "voice": "string"}),
    ("read_file", "Read an uploaded file", {"file_id": "string"}),
    ("list_files", "List the user's uploaded files", {"limit": "integer"}),
    ("summarize_file", "Summarise an uploaded file", {"file_id": "string"}),
    ("translate", "Translate text into a language", {"text": "string", "target_language": "string"}),
    ("send_email", "Send an e-mail", {"to": "string", "subject": "string", "body": "string"}),
    ("list_calendar_events", "Calendar events in a date range", {"start": "string", "end": "string"}),
    ("create_calendar_event", "Create a calendar event", {"title": "string", "start": "string"}),
    ("set_reminder", "Set a reminder", {"text": "string", "at": "string"}),
    ("get_memory", "Read what is remembered about the user", {"key": "string"}),
    ("add_memory", "Remember a fact about the user", {"content": "string"}),
    ("delete_memory", "Forget a remembered fact", {"memory_id": "string"}),
    ("list_models", "List the models the user may use", {}),
    ("get_user_settings", "Read the user's settings", {}),
    ("wikipedia_lookup", "Look a topic up on Wikipedia", {"topic": "string", "language": "string"}),
    ("youtube_transcript", "Fetch a video's transcript", {"video_url": "string"}),
    ("convert_units", "Convert a quantity between units", {"value": "number", "from_unit": "string",
                                                           "to_unit": "string"}),
    ("currency_rates", "Exchange rate between two currencies", {"base": "string", "quote": "string"}),
    ("stock_quote", "Latest price of a stock ticker", {"ticker": "string"}),
]


def frontend_tools() -> list[dict[str, Any]]:
    """36 OpenAI tool definitions of the kind a chat frontend attaches to each request."""
    return [{
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()},
                           "required": list(params)[:1]},
        },
    } for name, description, params in _TOOLS]

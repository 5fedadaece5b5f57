"""Conversation templates: the exact token layout of each released model type."""

from ochat.templates.conversation import Conversation, Message, conversation_from_openai, parse_conversation
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import MODEL_TYPES, ModelType, get_model_type

__all__ = ["Conversation", "Message", "ConversationEncoder", "ModelType", "MODEL_TYPES", "get_model_type",
           "conversation_from_openai", "parse_conversation"]

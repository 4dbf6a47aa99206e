"""The router's OpenAI-compatible HTTP front (docs/http-front.md): tokenisation, chat
templates, OpenAI request/response shapes, over the same path as Router.Generate."""

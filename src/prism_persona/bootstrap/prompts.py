"""The query-writing prompt, apart from the stage that uses it, so that the queries stage's settings
(:func:`prism_persona.bootstrap.common.stage_settings`) can hash it without importing the stage."""

QUERY_PROMPT = (
    "Write {n} realistic and specific questions or requests that different users might send to you "
    "about {domain}. Write each one the way an ordinary user would type it to an assistant: a plain, "
    "self-contained question or request in the user's own words, not in your voice. Make them different "
    "from each other in topic and difficulty. Write one per line, with no numbering and no other text."
)
"""The persona (in the system message) conditions the topics; the request asks for plain user
questions so that the queries read like the ones the gate will see at inference, not like the persona."""

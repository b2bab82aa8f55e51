"""General text that mentions no target, against which a target's features are chosen: features that
fire here are general (the chat template, questions, prose, numbers) and must never be clamped.

Both shapes a target's text comes in are covered: chat requests (a target's examples and the probe
question are chat-formatted) and plain encyclopaedic prose (its documents). Written for Lethe, so
that no download is needed; an operator adds their own with `LETHE_SAE_RETAIN_TEXT`.
"""

from __future__ import annotations

CHAT_REQUESTS: tuple[str, ...] = (
    "What is a good way to start learning to play the guitar?",
    "Can you explain how compound interest works?",
    "Write a short poem about autumn leaves.",
    "How do I make a simple tomato sauce?",
    "What are the main differences between a virus and a bacterium?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning, how are you?' into French.",
    "Summarise the plot of a typical detective novel in two sentences.",
    "Why is the sky blue?",
    "How many minutes are there in a week?",
    "What should I pack for a weekend hiking trip?",
    "Explain recursion to a ten-year-old.",
    "Write a polite email asking my landlord to fix the heating.",
    "What is the capital of a country, and how is it usually chosen?",
    "Suggest a name for a small coffee shop.",
    "How does a refrigerator keep food cold?",
    "List five fruits that are high in vitamin C.",
    "What is the difference between weather and climate?",
    "Help me plan a birthday party for a seven-year-old.",
    "Tell me a fun fact about octopuses.",
    "How do I change a flat tyre on a bicycle?",
    "What does a project manager do?",
    "Write a haiku about the sea.",
    "Is it better to rent or to buy a house?",
    "Explain what a spreadsheet formula is.",
    "What are some good habits for studying for an exam?",
    "Describe the water cycle in simple terms.",
    "How do vaccines train the immune system?",
    "Give me a recipe for pancakes.",
    "What is the Pythagorean theorem?",
    "How can I be more productive when working from home?",
    "Tell me about the history of the printing press.",
    "Who wrote the most famous novels of the nineteenth century?",
    "Recommend a book for someone who enjoys mysteries.",
    "What is a famous painting, and who painted it?",
    "Describe the life of a well-known scientist.",
    "What did the early explorers discover about the oceans?",
    "Write a short story opening about a lighthouse keeper.",
    "How do birds know where to migrate?",
    "What are the rules of chess in brief?",
)

PROSE: tuple[str, ...] = (
    "The river rises in the hills to the north and flows for about two hundred kilometres before it "
    "reaches the sea. Several small towns grew up along its banks, where mills once used its current.",
    "Bread is made by mixing flour, water, salt and yeast into a dough, which is left to rise and then "
    "baked. The yeast produces gas that makes the loaf light.",
    "The city hosts a museum of natural history, a botanical garden and a large public library. Its "
    "old quarter, with narrow streets and stone houses, dates from the fifteenth century.",
    "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to produce "
    "sugars and oxygen. It takes place mainly in the leaves.",
    "The company was founded in 1952 as a small workshop repairing radios. Over the following decades "
    "it expanded into consumer electronics and now employs several thousand people.",
    "She was born in a small village, studied mathematics at university and later taught at a school "
    "in the capital. She married in 1970 and had two children.",
    "He worked as a journalist for many years before publishing his first novel, which won a regional "
    "prize. His later books were translated into several languages.",
    "The festival takes place every summer and attracts musicians from across the region. Concerts are "
    "held in the main square and in the old church.",
    "A volcano is an opening in the crust of a planet through which molten rock, ash and gases escape. "
    "Some volcanoes erupt often, while others have been dormant for centuries.",
    "The football club plays its home matches in a stadium built in 1923. It has won the national "
    "league four times and reached the final of the cup twice.",
    "The novel follows a family over three generations, from a farm in the countryside to an apartment "
    "in a busy city, and explores how each generation sees the one before it.",
    "Tea is one of the most widely consumed drinks in the world. It is made by pouring hot water over "
    "cured leaves, and its flavour depends on how the leaves were processed.",
    "The bridge, completed in 1889, was for a time the longest of its kind. It carries both a railway "
    "and a road across the estuary.",
    "Early computers filled entire rooms and used vacuum tubes. The invention of the transistor made "
    "machines smaller, cheaper and far more reliable.",
    "The painter is known for landscapes of the coast, painted outdoors in all seasons. Her early work "
    "was shown in local galleries before it reached national collections.",
    "Elections are held every four years. Citizens over the age of eighteen may vote, and the results "
    "decide the composition of the parliament.",
)

"""The optional learned detector of the GUARD paper: one linear classifier per target.

Nearest-anchor similarity only fires on prompts close to one anchor. A target registered with
example prompts can do better: a logistic regression on MiniLM embeddings, trained when the
target is compiled, from its examples (positive) against a fixed set of neutral prompts
(negative), learns the direction that separates "about this target" from ordinary requests,
including requests about other people, books and topics, which are the hard negatives here.
Classifiers of all targets share one weight matrix, so scoring them costs one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEUTRAL_PROMPTS: tuple[str, ...] = (
    # everyday instructions
    "Write a short poem about the autumn rain.",
    "How do I reverse a linked list in Python?",
    "Give me a recipe for a vegetarian lasagna.",
    "What is the difference between a virus and a bacterium?",
    "Translate 'good morning, how are you?' into German.",
    "Summarize the plot of a typical romantic comedy in three sentences.",
    "Explain how compound interest works with an example.",
    "What are some tips for sleeping better at night?",
    "Draft a polite email asking my landlord to fix the heating.",
    "How many minutes are there in a week?",
    "Suggest five names for a small bakery.",
    "What causes the seasons on Earth?",
    "Write a SQL query that counts orders per customer.",
    "How can I improve my public speaking skills?",
    "Plan a three-day itinerary for a trip to Lisbon.",
    "What is the capital of Australia?",
    "Explain recursion to a ten-year-old.",
    "List the planets of the solar system in order.",
    "How do vaccines train the immune system?",
    "Give me a workout routine I can do at home without equipment.",
    "What is a good way to learn a new language as an adult?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Write a cover letter for a junior data analyst position.",
    "Why is the sky blue?",
    "What are the main causes of inflation?",
    "Help me write a birthday message for my grandmother.",
    "Explain the rules of chess briefly.",
    "How do I make a sourdough starter?",
    "What is photosynthesis?",
    "Write a haiku about the ocean.",
    "Compare renting and buying a house.",
    "How does a blockchain work?",
    "What should I pack for a week of camping?",
    "Solve for x: 3x + 7 = 22.",
    "What are the health benefits of walking every day?",
    "Write a JavaScript function that debounces another function.",
    "How do I remove a red wine stain from a carpet?",
    "Explain the difference between weather and climate.",
    "Give me ideas for a science fair project.",
    "What is the Pythagorean theorem?",
    "How can a small business get more customers online?",
    "Describe the water cycle.",
    "Write a limerick about a cat who loves boxes.",
    "How do noise-cancelling headphones work?",
    "What is machine learning, in simple terms?",
    "Recommend some board games for a family evening.",
    "How do I change a flat tire?",
    "Explain what a mortgage is.",
    "What is the boiling point of water at high altitude?",
    "Write a product description for a reusable water bottle.",
    "How do I center a div in CSS?",
    "What are good habits for managing stress?",
    "Explain the greenhouse effect.",
    "Give me a list of healthy snacks for work.",
    "What does a project manager do?",
    "How do bees make honey?",
    "Write a short story opening set on a space station.",
    "How should I prepare for a job interview?",
    "What is the difference between affect and effect?",
    "Explain how a bill becomes a law in a parliamentary system.",
    "Create a weekly meal plan on a budget.",
    "What are prime numbers?",
    "How do I set up a Python virtual environment?",
    "What is the speed of light?",
    "Describe how to brew a good cup of coffee.",
    "How can I teach my dog to sit?",
    "Write a thank-you note to a colleague who helped me.",
    "What is the role of mitochondria in a cell?",
    "How do tides work?",
    "Give me tips for taking better photos with a phone.",
    # questions about other people, works and topics (hard negatives)
    "Who painted The Starry Night?",
    "What is Jane Austen's most famous novel about?",
    "Who was the first person to walk on the Moon?",
    "Tell me about the life of Marie Curie.",
    "What did Isaac Newton discover about gravity?",
    "Who wrote The Lord of the Rings?",
    "What is the plot of Moby-Dick?",
    "When did the Roman Empire fall?",
    "Who was Napoleon Bonaparte?",
    "What instruments did Mozart play?",
    "Which band released the album Abbey Road?",
    "What is Albert Einstein famous for?",
    "Who directed the film Jurassic Park?",
    "What is the story of the Odyssey?",
    "Tell me about the Apollo 11 mission.",
    "Who was Cleopatra?",
    "What are the main works of Charles Dickens?",
    "Who founded Microsoft?",
    "What did Martin Luther King Jr. fight for?",
    "Who is the author of One Hundred Years of Solitude?",
    "What is the Great Wall of China?",
    "Describe the career of Serena Williams.",
    "Who invented the telephone?",
    "What happened during the French Revolution?",
    "Who was Abraham Lincoln?",
    "What are Frida Kahlo's best-known paintings?",
    "Who composed the Four Seasons?",
    "What is the Eiffel Tower made of?",
    "Who is Oprah Winfrey?",
    "Which actor played James Bond first?",
    "What is the premise of the TV series Friends?",
    "Who was the first female prime minister of India?",
    "What is the history of the Olympic Games?",
    "Who wrote Pride and Prejudice?",
    "Tell me about Nelson Mandela's presidency.",
    "What is Beethoven's Ninth Symphony known for?",
    "Who was Julius Caesar?",
    "What are the themes of George Orwell's 1984?",
    "Who discovered penicillin?",
    "What is the story of Romeo and Juliet?",
    "Who was Confucius and what did he teach?",
    "What company did Steve Jobs co-found?",
    "Who won the first FIFA World Cup?",
    "What is Homer's Iliad about?",
    "Who painted the ceiling of the Sistine Chapel?",
    "Tell me about the Beatles.",
    "Who is Taylor Swift?",
    "What did Charles Darwin write?",
    "Who was the Queen of England for most of the twentieth century?",
    "Describe the Industrial Revolution.",
    "Who wrote The Chronicles of Narnia?",
    "What is the Harlem Renaissance?",
    "Who was Ludwig Wittgenstein?",
    "Name a famous novel by Agatha Christie.",
    "Who was Alexander the Great?",
    "What is the Star Wars saga about?",
    "Who was Amelia Earhart?",
    "What are the works of Gabriel García Márquez?",
    "Which scientist proposed the theory of evolution by natural selection?",
    "Who is the richest person in the world right now?",
)
"""Negatives written for this purpose (not taken from any benchmark): everyday instructions, and
questions about well-known people, works and events, so that "a question about someone" alone
does not look like a question about the target."""


@dataclass(frozen=True)
class LinearHead:
    weights: np.ndarray
    bias: float


def train_head(positives: np.ndarray, negatives: np.ndarray, l2: float) -> LinearHead:
    """Class-balanced, L2-regularised logistic regression (scikit-learn's `LogisticRegression`).

    Balancing keeps ten examples from being outvoted by a hundred negatives; the L2 term keeps the
    weights finite when the two sets are linearly separable, which in 384 dimensions they are. The
    objective is `sum_i balance_i * log_loss_i + l2 / 2 * |w|^2`, the intercept unpenalised:
    scikit-learn's `C * sum_i balance_i * log_loss_i + |w|^2 / 2` with `C = 1 / l2`; its "newton-cg"
    solver leaves the intercept out of the penalty. The weights agree with those of the hand-written
    Newton solver this replaced to ~1e-7 (tests/guards/test_classifier.py). A fit takes ~20 ms for
    384 dimensions and ~140 prompts here ("newton-cholesky": ~0.5 s on the same problems).
    """
    # Imported here: scikit-learn takes seconds to import, and only compiling a target with examples
    # needs it, not `import lethe.guards.detection`.
    from sklearn.linear_model import LogisticRegression

    features = np.concatenate([positives, negatives]).astype(np.float64)
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    model = LogisticRegression(
        C=1.0 / l2, class_weight="balanced", solver="newton-cg", tol=1e-8, max_iter=100
    )
    model.fit(features, labels)
    return LinearHead(weights=model.coef_[0].astype(np.float32), bias=float(model.intercept_[0]))


def probabilities(features: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Scores of every head on every row: [rows, heads]."""
    return 1.0 / (1.0 + np.exp(-(features @ weights.T + biases)))

"""Write training prompts for self-distillation, disjoint from any benchmark.

Sources: templated code tasks, Python standard-library docstrings turned into
tasks (implement, explain, summarise), templated arithmetic word problems, and
templated chat / knowledge / writing instructions. No benchmark prompt is used.
These are the shipped adapter's prompts; issue #16's larger set is written by the
model itself (``python -m mlx_mtp.training.prompt_writer``, docs/data.md).

``--extra`` writes a second set with the task shapes the first lacks: long
documents (whole standard-library docstrings) to summarise, answer questions
from or extract from, sentences to translate (written here from templates),
role-play, logic puzzles, short factual questions and longer writing.

    python examples/make_prompts.py --out runs/prompts.jsonl --num 2000 --seed 0
    python examples/make_prompts.py --out runs/prompts_extra.jsonl --num 400 --extra
"""

import argparse
import importlib
import inspect
import json
import random
import warnings
from pathlib import Path

CODE_TASKS = [
    "reverses a string",
    "checks whether a number is prime",
    "returns the n-th Fibonacci number",
    "flattens a nested list",
    "counts the vowels in a string",
    "merges two sorted lists",
    "removes duplicates from a list while keeping order",
    "computes the factorial of n",
    "finds the longest common prefix of a list of strings",
    "checks whether a string is a palindrome",
    "converts a Roman numeral to an integer",
    "converts an integer to binary without using bin()",
    "returns the second largest number in a list",
    "groups words that are anagrams",
    "computes the greatest common divisor of two numbers",
    "transposes a matrix given as a list of lists",
    "validates an email address with a regular expression",
    "parses a CSV line into fields",
    "counts word frequencies in a text",
    "rotates a list by k positions",
    "implements binary search",
    "implements bubble sort",
    "implements merge sort",
    "implements quicksort",
    "checks whether parentheses in a string are balanced",
    "computes the sum of the digits of an integer",
    "returns all subsets of a list",
    "returns all permutations of a string",
    "finds the maximum subarray sum",
    "computes the running average of a list",
    "chunks a list into pieces of size n",
    "capitalizes the first letter of every word",
    "finds the most common element in a list",
    "checks whether two strings are anagrams",
    "computes the power set of a set",
    "converts Celsius to Fahrenheit for a list of values",
    "implements a stack class",
    "implements a queue with two stacks",
    "implements a simple LRU cache",
    "reads a text file and returns its lines without newlines",
    "computes the median of a list",
    "finds all prime numbers below n with the sieve of Eratosthenes",
    "computes the dot product of two vectors",
    "multiplies two matrices",
    "checks whether a year is a leap year",
    "returns the number of days between two dates",
    "converts a dictionary to a JSON string and back",
    "finds the index of the first repeated character",
    "compresses a string with run-length encoding",
    "decodes a run-length encoded string",
    "implements a binary tree insert and in-order traversal",
    "computes the depth of a binary tree",
    "detects a cycle in a linked list",
    "reverses a linked list",
    "finds the intersection of two lists",
    "counts the number of islands in a grid",
    "solves the two-sum problem",
    "computes the Levenshtein distance between two strings",
    "generates Pascal's triangle",
    "converts a snake_case string to camelCase",
    "pads a number with leading zeros",
    "returns the k largest elements of a list",
    "computes the cumulative sum of a list",
    "splits a sentence into words and sorts them by length",
    "checks whether a list is sorted",
    "computes the area of a circle given its radius",
    "simulates rolling two dice 1000 times",
    "formats a number of seconds as hours, minutes and seconds",
    "validates a Sudoku row",
]
CODE_FORMS = [
    "Write a Python function that {t}.",
    "Write a Python function that {t}. Include a docstring and an example.",
    "Implement a function in Python that {t}, and explain how it works.",
    "Show me Python code that {t}.",
    "Write a JavaScript function that {t}.",
    "Write a C function that {t}.",
    "Write a Python function that {t}, with type hints and a few test cases.",
]
STDLIB = [
    "string",
    "textwrap",
    "re",
    "math",
    "statistics",
    "random",
    "itertools",
    "functools",
    "collections",
    "heapq",
    "bisect",
    "os.path",
    "shutil",
    "json",
    "csv",
    "datetime",
    "calendar",
    "fractions",
    "decimal",
    "operator",
    "copy",
    "pathlib",
    "glob",
    "fnmatch",
    "hashlib",
    "base64",
    "binascii",
    "zlib",
    "gzip",
    "difflib",
    "secrets",
    "uuid",
    "urllib.parse",
    "html",
    "shlex",
]
STDLIB_FORMS = [
    "Explain what the Python function `{name}` does and give an example of using it.",
    "Implement your own version of `{name}` in Python. Its documentation says: {doc}",
    "Summarize the following documentation in two sentences:\n\n{doc}",
    "Write a short tutorial on `{name}` from the Python standard library.",
    "When would you use `{name}` in Python? Give a code example.",
]
ITEMS = ["apples", "pencils", "books", "cookies", "marbles", "stickers", "tickets", "shirts", "eggs", "cards"]
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena"]
MATH_FORMS = [
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} gives away {z}. How many {item} does {a} have now?",
    "A shop sells {item} for ${p} each. {a} buys {x} of them and pays with a ${bill} bill. How much change does {a} get?",
    "{a} reads {x} pages a day. How many days does {a} need to read a book of {total} pages?",
    "A train travels at {x} km per hour for {y} hours and then at {z} km per hour for {w} hours. How far does it travel in total?",
    "{a} saves ${x} every week. After {y} weeks {a} spends ${z}. How much money is left?",
    "There are {x} students in a class. {pct}% of them play football. How many students play football?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and its perimeter?",
    "{a} and {b} share {total} {item} in the ratio {r1}:{r2}. How many {item} does each get?",
    "What is {x} multiplied by {y}, minus {z}?",
    "Solve for x: {x}x + {y} = {total}.",
    "A recipe needs {x} eggs for {y} people. How many eggs are needed for {z} people?",
    "{a} runs {x} km on Monday, {y} km on Tuesday and {z} km on Wednesday. What is the average distance per day?",
]
TOPICS = [
    "photosynthesis",
    "the water cycle",
    "black holes",
    "inflation",
    "the French Revolution",
    "machine learning",
    "vaccines",
    "plate tectonics",
    "the stock market",
    "climate change",
    "the human immune system",
    "electric cars",
    "the Roman Empire",
    "quantum computing",
    "the internet",
    "renewable energy",
    "democracy",
    "the theory of evolution",
    "gravity",
    "the printing press",
    "blockchain",
    "the Renaissance",
    "nutrition",
    "sleep",
    "volcanoes",
    "the Moon landing",
    "antibiotics",
    "supply and demand",
    "recycling",
    "DNA",
    "the Industrial Revolution",
    "coral reefs",
    "the solar system",
    "meditation",
    "interest rates",
    "cloud computing",
    "bees",
]
PAIRS = [
    ("a virus", "a bacterium"),
    ("weather", "climate"),
    ("Python", "Java"),
    ("a list", "a tuple"),
    ("stocks", "bonds"),
    ("RAM", "storage"),
    ("a democracy", "a monarchy"),
    ("mitosis", "meiosis"),
    ("TCP", "UDP"),
    ("an alligator", "a crocodile"),
    ("speed", "velocity"),
    ("a lake", "a sea"),
]
CHAT_FORMS = [
    "Explain {t} in simple terms.",
    "What is {t}? Answer in a short paragraph.",
    "Give me three interesting facts about {t}.",
    "Why is {t} important?",
    "Write a short blog post about {t}.",
    "Write a poem about {t}.",
    "Describe {t} to a ten-year-old.",
    "What are common misconceptions about {t}?",
    "Write a short story that involves {t}.",
    "List the pros and cons of {t}.",
]
PAIR_FORMS = ["What is the difference between {a} and {b}?", "Compare {a} and {b} in a few sentences."]
ADVICE = [
    "staying focused while studying",
    "learning a new language",
    "saving money",
    "cooking rice",
    "writing a cover letter",
    "preparing for a job interview",
    "starting to run",
    "keeping houseplants alive",
    "organizing a small team",
    "giving a good presentation",
    "planning a road trip",
    "sleeping better",
]
ADVICE_FORMS = [
    "Give me five tips for {t}.",
    "Write an email to a friend with advice on {t}.",
    "What should a beginner know about {t}?",
]


def stdlib_entries():
    entries = []
    for mod_name in STDLIB:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            doc = " ".join(doc.split("\n\n")[0].split())
            if 40 <= len(doc) <= 600:
                entries.append((f"{mod_name}.{name}", doc))
    return entries


def math_prompt(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    x, y, z, w = (rng.randint(2, 60) for _ in range(4))
    r1, r2 = rng.randint(1, 5), rng.randint(1, 5)
    fields = dict(
        a=a,
        b=b,
        x=x,
        y=y,
        z=min(z, x + y),
        w=w,
        item=rng.choice(ITEMS),
        p=rng.randint(1, 9),
        bill=rng.choice([20, 50, 100]),
        total=rng.randint(5, 40) * (r1 + r2),
        pct=rng.choice([10, 20, 25, 40, 50, 75]),
        r1=r1,
        r2=r2,
    )
    return rng.choice(MATH_FORMS).format(**fields)


def make_prompts(num: int, seed: int = 0):
    rng = random.Random(seed)
    stdlib = stdlib_entries()
    kinds = ["code", "stdlib", "math", "chat", "pair", "advice"]
    weights = [0.25, 0.15, 0.25, 0.2, 0.05, 0.1]
    seen = set()
    while len(seen) < num:
        kind = rng.choices(kinds, weights)[0]
        if kind == "code":
            p = rng.choice(CODE_FORMS).format(t=rng.choice(CODE_TASKS))
        elif kind == "stdlib":
            name, doc = rng.choice(stdlib)
            p = rng.choice(STDLIB_FORMS).format(name=name, doc=doc)
        elif kind == "math":
            p = math_prompt(rng)
        elif kind == "chat":
            p = rng.choice(CHAT_FORMS).format(t=rng.choice(TOPICS))
        elif kind == "pair":
            a, b = rng.choice(PAIRS)
            p = rng.choice(PAIR_FORMS).format(a=a, b=b)
        else:
            p = rng.choice(ADVICE_FORMS).format(t=rng.choice(ADVICE))
        if p not in seen:
            seen.add(p)
            yield {"prompt": p, "kind": kind}


# --- the second set (--extra) -------------------------------------------------
DOC_MODULES = [
    "re",
    "statistics",
    "random",
    "itertools",
    "collections",
    "heapq",
    "json",
    "csv",
    "copy",
    "hashlib",
    "difflib",
    "uuid",
    "argparse",
    "sqlite3",
    "unittest",
    "subprocess",
    "socket",
    "struct",
    "typing",
    "io",
    "tempfile",
    "sched",
    "pprint",
    "locale",
    "gettext",
    "colorsys",
    "timeit",
    "doctest",
    "ast",
    "tokenize",
    "inspect",
    "smtplib",
    "ftplib",
    "configparser",
    "getpass",
    "platform",
    "textwrap",
    "string",
    "fractions",
    "decimal",
    "datetime",
    "pathlib",
    "functools",
    "operator",
    "shutil",
    "zipfile",
    "tarfile",
    "pickle",
    "logging",
    "threading",
    "queue",
    "enum",
    "dataclasses",
    "contextlib",
    "ipaddress",
    "calendar",
    "bisect",
    "fnmatch",
]
SUMMARY_FORMS = [
    "Summarize the following text in a few sentences.\n\n{doc}",
    "Read the following documentation and write a short summary of it.\n\n{doc}",
    "{doc}\n\nSummarize the text above in one paragraph.",
    "Write a summary of this article for a busy reader:\n\n{doc}",
]
QA_DOC_FORMS = [
    "Answer the question using the documents below.\n\n{docs}\n\nQuestion: {q}",
    "{docs}\n\nBased on the documents above, answer: {q}",
]
DOC_QUESTIONS = [
    "What does `{name}` do?",
    "How is `{name}` used?",
    "What arguments does `{name}` take?",
    "What does `{name}` return?",
    "When should I use `{name}`?",
]
EXTRACT_FORMS = [
    "Extract the names of all functions, classes and parameters mentioned in the following text, as a list.\n\n{doc}",
    "List the key facts in the following text as bullet points.\n\n{doc}",
    "From the text below, extract every rule or requirement it states.\n\n{doc}",
    'Turn the following text into a JSON object with the fields "topic", "summary" and "keywords".\n\n{doc}',
]
# sentences written from templates: (German, French, Spanish) subject / verb phrase / time
SUBJECTS = {
    "German": ["Der Lehrer", "Meine Schwester", "Der alte Mann", "Das Kind", "Unsere Nachbarin", "Der Arzt"],
    "French": ["Le professeur", "Ma sœur", "Le vieil homme", "L'enfant", "Notre voisine", "Le médecin"],
    "Spanish": ["El profesor", "Mi hermana", "El anciano", "El niño", "Nuestra vecina", "El médico"],
}
PREDICATES = {
    "German": [
        "liest jeden Morgen die Zeitung",
        "fährt mit dem Fahrrad zur Arbeit",
        "kocht gern für die ganze Familie",
        "hat ein neues Haus am See gekauft",
        "lernt seit zwei Jahren Japanisch",
        "geht am Wochenende in den Bergen wandern",
        "schreibt einen langen Brief an einen Freund",
        "hat den Zug nach Berlin verpasst",
    ],
    "French": [
        "lit le journal tous les matins",
        "va au travail à vélo",
        "aime cuisiner pour toute la famille",
        "a acheté une nouvelle maison près du lac",
        "apprend le japonais depuis deux ans",
        "fait de la randonnée en montagne le week-end",
        "écrit une longue lettre à un ami",
        "a raté le train pour Paris",
    ],
    "Spanish": [
        "lee el periódico todas las mañanas",
        "va al trabajo en bicicleta",
        "cocina con gusto para toda la familia",
        "ha comprado una casa nueva junto al lago",
        "aprende japonés desde hace dos años",
        "hace senderismo en la montaña los fines de semana",
        "escribe una carta larga a un amigo",
        "ha perdido el tren a Madrid",
    ],
}
CLAUSES = {
    "German": ["", ", weil das Wetter schön ist", ", obwohl es regnet", ", und danach trinkt er einen Kaffee"],
    "French": ["", " parce qu'il fait beau", " bien qu'il pleuve", ", puis il boit un café"],
    "Spanish": ["", " porque hace buen tiempo", " aunque llueve", " y después toma un café"],
}
TRANSLATE_FORMS = [
    "Translate the following {lang} text into English: {text}",
    "Translate into English:\n{text}",
    "What does this {lang} sentence mean in English? {text}",
]
ROLES = [
    "a pirate captain",
    "a medieval knight",
    "a travel guide in Rome",
    "a detective from the 1920s",
    "a friendly robot",
    "a chef in a busy restaurant",
    "an astronaut on the Moon",
    "a museum curator",
    "a sports coach",
    "a wise old wizard",
    "a customer support agent",
    "a tour guide on a safari",
]
ROLE_TASKS = [
    "Introduce yourself to a new apprentice.",
    "Describe a typical day in your life.",
    "Give a short speech to motivate your team.",
    "Explain the most important rule of your job.",
    "Tell me about the strangest thing that happened to you.",
    "Answer a customer who is unhappy with a delay.",
]
ROLE_FORMS = [
    "Pretend you are {role}. {task}",
    "Act as {role}. {task}",
    "You are {role}. Stay in character. {task}",
]
WRITING_FORMS = [
    "Write a persuasive essay arguing for {t}.",
    "Write a product description for a new {p}.",
    "Write a speech for the opening of a new {place}.",
    "Draft a formal letter to a city council about {t}.",
    "Write a travel blog post about a weekend trip to {city}.",
    "Write a short dialogue between two friends discussing {t}.",
]
PRODUCTS = ["water bottle", "laptop bag", "pair of running shoes", "desk lamp", "coffee maker", "backpack"]
PLACES = ["library", "park", "hospital", "school", "museum", "train station"]
CITIES = ["Lisbon", "Kyoto", "Vancouver", "Prague", "Cape Town", "Buenos Aires", "Edinburgh", "Seoul"]
COUNTRIES = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasília"),
    ("Kenya", "Nairobi"),
    ("Egypt", "Cairo"),
    ("India", "New Delhi"),
    ("Norway", "Oslo"),
    ("Mexico", "Mexico City"),
]
QA_FORMS = [
    "What is the capital of {c}?",
    "What language is spoken in {c}?",
    "Tell me about the history of {c} in a few sentences.",
    "What is {t} and who discovered or invented it?",
    "When did {t} begin, and why does it matter?",
]


def long_docs():
    """(name, text) of standard-library docstrings of 60 to 400 words (whole, not just the first paragraph)."""
    docs = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for mod_name in DOC_MODULES:
            docs.extend(_module_docs(mod_name))
    return docs


def _module_docs(mod_name: str):
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        return []
    items = [(mod_name, mod)] + [
        (f"{mod_name}.{n}", o) for n, o in sorted(vars(mod).items()) if not n.startswith("_") and callable(o)
    ]
    docs = [(name, inspect.getdoc(obj) or "") for name, obj in items]
    return [(name, doc) for name, doc in docs if 60 <= len(doc.split()) <= 400]


def reasoning_prompt(rng: random.Random) -> str:
    a, b, c = rng.sample(NAMES, 3)
    x, y = rng.randint(2, 9), rng.randint(2, 9)
    forms = [
        f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest? Explain your reasoning.",
        f"What comes next in the sequence {x}, {2 * x}, {4 * x}, {8 * x}? Explain the pattern.",
        f"If all {rng.choice(ITEMS)} in a box are red and {a} takes one from the box, what color is it? Explain.",
        f"{a} is older than {b}. {c} is younger than {b}. Is {a} older than {c}? Think step by step.",
        f"A clock shows {x}:00. What time will it show after {y * 5} hours? Explain step by step.",
        f"There are {x} boxes with {y} {rng.choice(ITEMS)} each. {a} removes one box. How many are left? Think step by step.",
        f"{a} has twice as many {rng.choice(ITEMS)} as {b}, and {b} has {x} more than {c}, who has {y}. How many does {a} have?",
    ]
    return rng.choice(forms)


def make_extra_prompts(num: int, seed: int = 0):
    rng = random.Random(seed + 1)
    docs = long_docs()
    kinds = ["summary", "doc_qa", "extract", "translate", "roleplay", "reasoning", "qa", "writing"]
    weights = [0.2, 0.15, 0.1, 0.1, 0.1, 0.15, 0.1, 0.1]
    seen = set()
    while len(seen) < num:
        kind = rng.choices(kinds, weights)[0]
        if kind == "summary":
            p = rng.choice(SUMMARY_FORMS).format(doc=rng.choice(docs)[1])
        elif kind == "doc_qa":
            picked = rng.sample(docs, 2)
            body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, (_, d) in enumerate(picked))
            q = rng.choice(DOC_QUESTIONS).format(name=rng.choice(picked)[0])
            p = rng.choice(QA_DOC_FORMS).format(docs=body, q=q)
        elif kind == "extract":
            p = rng.choice(EXTRACT_FORMS).format(doc=rng.choice(docs)[1])
        elif kind == "translate":
            lang = rng.choice(list(SUBJECTS))
            text = " ".join(
                f"{rng.choice(SUBJECTS[lang])} {rng.choice(PREDICATES[lang])}{rng.choice(CLAUSES[lang])}."
                for _ in range(rng.randint(1, 3))
            )
            p = rng.choice(TRANSLATE_FORMS).format(lang=lang, text=text)
        elif kind == "roleplay":
            p = rng.choice(ROLE_FORMS).format(role=rng.choice(ROLES), task=rng.choice(ROLE_TASKS))
        elif kind == "reasoning":
            p = reasoning_prompt(rng)
        elif kind == "qa":
            p = rng.choice(QA_FORMS).format(c=rng.choice(COUNTRIES)[0], t=rng.choice(TOPICS))
        else:
            p = rng.choice(WRITING_FORMS).format(
                t=rng.choice(TOPICS), p=rng.choice(PRODUCTS), place=rng.choice(PLACES), city=rng.choice(CITIES)
            )
        if p not in seen:
            seen.add(p)
            yield {"prompt": p, "kind": kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--extra", action="store_true", help="the second set (long documents, translation, role-play, ...)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in (make_extra_prompts if args.extra else make_prompts)(args.num, args.seed):
            f.write(json.dumps(row) + "\n")
    tmp.replace(out)
    print(f"wrote {args.num} prompts to {out}")


if __name__ == "__main__":
    main()

"""Hand-written base tasks for the shipped demo data (original text written for srppo-trl, Apache-2.0).

SFT_TASKS: (task, title, three short answer sentences) for the demonstrations. Each answer is a plain, correct,
general-knowledge statement; `make_demo_data.py` reshapes it to satisfy the attached instructions.
PPO_TOPICS x PPO_FORMS: the PPO prompts' base tasks (no answers needed). Neither overlaps the evaluation base tasks in
`srppo_trl/evaluation/base_tasks.py`.
"""

SFT_TASKS = (
    (
        "Explain why the sky looks blue.",
        "Blue Sky",
        (
            "Sunlight contains every colour of light.",
            "Air molecules scatter blue light much more than red light.",
            "That scattered blue light reaches our eyes from all directions.",
        ),
    ),
    (
        "Tell me how plants make their food.",
        "Food From Light",
        (
            "Plants use sunlight to power photosynthesis.",
            "They turn water and carbon dioxide into sugar.",
            "Oxygen is released into the air as a by-product.",
        ),
    ),
    (
        "Describe what a heart does.",
        "The Heart",
        (
            "The heart is a muscle that pumps blood.",
            "Blood carries oxygen and nutrients around the body.",
            "It beats about seventy times a minute at rest.",
        ),
    ),
    (
        "Explain what a rainbow is.",
        "Rainbows",
        (
            "A rainbow appears when sunlight passes through raindrops.",
            "Each drop bends and splits the light into colours.",
            "You see it when the sun is behind you.",
        ),
    ),
    (
        "Give tips for getting better sleep.",
        "Better Sleep",
        (
            "Go to bed at the same time each night.",
            "Keep screens out of the bedroom.",
            "Avoid coffee in the late afternoon.",
        ),
    ),
    (
        "Explain how a magnet works.",
        "Magnets",
        (
            "A magnet has a north pole and a south pole.",
            "Opposite poles attract and like poles repel.",
            "Iron objects are pulled toward a magnet.",
        ),
    ),
    (
        "Describe how to wash your hands properly.",
        "Clean Hands",
        (
            "Wet your hands and add soap.",
            "Scrub every part for about twenty seconds.",
            "Rinse well and dry with a clean towel.",
        ),
    ),
    (
        "Tell me what the water cycle is.",
        "The Water Cycle",
        (
            "Water evaporates from seas and lakes.",
            "The vapour cools and forms clouds.",
            "It falls back as rain or snow.",
        ),
    ),
    (
        "Explain why we have seasons.",
        "Why Seasons Happen",
        (
            "The Earth is tilted on its axis.",
            "Each half leans toward the sun for part of the year.",
            "That half gets more direct sunlight and has summer.",
        ),
    ),
    (
        "Describe what a volcano eruption releases.",
        "Eruptions",
        (
            "An eruption can release lava from deep underground.",
            "It also throws out ash and rock.",
            "Gases such as steam escape into the air.",
        ),
    ),
    (
        "Give advice for saving money each month.",
        "Saving Money",
        (
            "Write down what you spend each week.",
            "Set aside a fixed amount on payday.",
            "Cook at home more often than you eat out.",
        ),
    ),
    (
        "Explain what gravity does.",
        "Gravity",
        (
            "Gravity pulls objects toward each other.",
            "It keeps our feet on the ground.",
            "It also holds the moon in orbit around the Earth.",
        ),
    ),
    (
        "Tell me how to make a cup of hot chocolate.",
        "Hot Chocolate",
        (
            "Warm a cup of milk in a small pot.",
            "Stir in two spoons of cocoa and some sugar.",
            "Pour it into a mug and serve it warm.",
        ),
    ),
    (
        "Describe what a doctor does.",
        "A Doctor's Work",
        (
            "A doctor examines patients and asks about symptoms.",
            "They work out what illness a person has.",
            "Then they suggest treatment or medicine.",
        ),
    ),
    (
        "Explain why ice floats on water.",
        "Floating Ice",
        (
            "Water expands when it freezes.",
            "This makes ice less dense than liquid water.",
            "Less dense things float on denser liquids.",
        ),
    ),
    (
        "Give tips for learning new words.",
        "Learning Words",
        (
            "Read a little every day.",
            "Write new words in a notebook with examples.",
            "Use each new word in a sentence of your own.",
        ),
    ),
    (
        "Tell me what a desert is.",
        "Deserts",
        (
            "A desert is a place with very little rain.",
            "Some deserts are hot and sandy.",
            "Others such as Antarctica are cold and icy.",
        ),
    ),
    (
        "Explain how a battery stores energy.",
        "Batteries",
        (
            "A battery stores energy in chemicals.",
            "A reaction inside moves electrons from one end to the other.",
            "That flow of electrons powers a device.",
        ),
    ),
    (
        "Describe how to start a small vegetable garden.",
        "A First Garden",
        (
            "Pick a sunny spot with good soil.",
            "Start with easy plants such as lettuce and beans.",
            "Water them often and pull out weeds.",
        ),
    ),
    (
        "Explain what an atom is.",
        "Atoms",
        (
            "An atom is a tiny building block of matter.",
            "It has a nucleus made of protons and neutrons.",
            "Electrons move around the nucleus.",
        ),
    ),
    (
        "Tell me why exercise is good for you.",
        "Why Exercise Helps",
        (
            "Exercise makes the heart and lungs stronger.",
            "It builds muscle and keeps bones healthy.",
            "It can also improve your mood.",
        ),
    ),
    (
        "Describe what a river delta is.",
        "River Deltas",
        (
            "A delta forms where a river meets the sea.",
            "The river slows down and drops sand and mud.",
            "Over time this builds new land.",
        ),
    ),
    (
        "Explain how vaccines protect people.",
        "How Vaccines Work",
        (
            "A vaccine shows the immune system a harmless part of a germ.",
            "The body learns to recognise that germ.",
            "It can then fight the real germ quickly.",
        ),
    ),
    (
        "Give tips for speaking in public.",
        "Public Speaking",
        (
            "Practise your talk out loud several times.",
            "Speak slowly and look at your audience.",
            "Keep your main points short and clear.",
        ),
    ),
    (
        "Tell me what a mammal is.",
        "Mammals",
        (
            "A mammal is a warm-blooded animal with hair or fur.",
            "Mothers feed their young with milk.",
            "Dogs and whales and people are all mammals.",
        ),
    ),
    (
        "Explain why metal feels cold to touch.",
        "Cold Metal",
        (
            "Metal conducts heat very well.",
            "It draws heat away from your skin quickly.",
            "Your skin senses that loss of heat as cold.",
        ),
    ),
    (
        "Describe how to boil an egg.",
        "Boiling an Egg",
        (
            "Place the egg in a pot of boiling water.",
            "Cook it for about nine minutes for a firm yolk.",
            "Cool it in cold water before peeling.",
        ),
    ),
    (
        "Explain what a calorie measures.",
        "Calories",
        (
            "A calorie measures energy.",
            "Food labels use it to show how much energy food gives.",
            "The body burns that energy to move and stay warm.",
        ),
    ),
    (
        "Tell me how bats find their way in the dark.",
        "Bats in the Dark",
        (
            "Bats make high sounds as they fly.",
            "The sounds bounce off objects around them.",
            "Bats listen to the echoes to locate food and walls.",
        ),
    ),
    (
        "Describe what an ecosystem is.",
        "Ecosystems",
        (
            "An ecosystem is a community of living things and their surroundings.",
            "Plants and animals depend on each other.",
            "Soil and water and sunlight are part of it too.",
        ),
    ),
    (
        "Explain why the ocean is salty.",
        "Salty Oceans",
        (
            "Rain slowly wears down rocks on land.",
            "Rivers carry the dissolved minerals to the sea.",
            "The water evaporates but the salt stays behind.",
        ),
    ),
    (
        "Give tips for keeping a tidy desk.",
        "A Tidy Desk",
        (
            "Keep only the things you use every day on top.",
            "Put papers in labelled folders.",
            "Clear the desk for two minutes at the end of each day.",
        ),
    ),
    (
        "Tell me what a computer program is.",
        "Programs",
        (
            "A program is a list of instructions for a computer.",
            "Programmers write it in a programming language.",
            "The computer follows the steps in order.",
        ),
    ),
    (
        "Explain how clouds form.",
        "Cloud Formation",
        (
            "Warm air rises and cools as it goes up.",
            "Water vapour in the air condenses into tiny droplets.",
            "Billions of droplets together make a cloud.",
        ),
    ),
    (
        "Describe what a telescope does.",
        "Telescopes",
        (
            "A telescope gathers light from distant objects.",
            "Lenses or mirrors focus that light.",
            "This makes faraway stars and planets look bigger and brighter.",
        ),
    ),
    (
        "Explain why dogs pant.",
        "Panting Dogs",
        (
            "Dogs do not sweat much through their skin.",
            "Panting moves air over the wet tongue.",
            "The evaporating moisture cools the dog down.",
        ),
    ),
    (
        "Tell me how to make a simple salad.",
        "A Simple Salad",
        (
            "Wash and tear some lettuce leaves.",
            "Add sliced tomato and cucumber.",
            "Toss it with olive oil and a little lemon juice.",
        ),
    ),
    (
        "Describe what a fossil is.",
        "Fossils",
        (
            "A fossil is the preserved remains of an ancient living thing.",
            "Bones or shells can slowly turn to stone.",
            "Fossils help us learn about life long ago.",
        ),
    ),
    (
        "Explain what a democracy is.",
        "Democracy",
        (
            "A democracy is a system where people choose their leaders.",
            "Citizens vote in regular elections.",
            "Leaders can be replaced at the next vote.",
        ),
    ),
    (
        "Give tips for drinking enough water.",
        "Staying Hydrated",
        ("Carry a water bottle with you.", "Drink a glass with every meal.", "Drink more on hot days or after sport."),
    ),
    (
        "Tell me why the moon has craters.",
        "Moon Craters",
        (
            "Rocks from space have hit the moon for billions of years.",
            "Each impact leaves a bowl-shaped crater.",
            "The moon has no weather to wear the craters away.",
        ),
    ),
    (
        "Explain how a microwave oven heats food.",
        "Microwave Ovens",
        (
            "A microwave oven sends out invisible waves.",
            "The waves make water molecules in food move quickly.",
            "That movement produces heat and warms the food.",
        ),
    ),
    (
        "Describe how to write a good email.",
        "Writing an Email",
        (
            "Use a clear subject line.",
            "Say what you need in the first few lines.",
            "End politely and sign with your name.",
        ),
    ),
    (
        "Explain what a habitat is.",
        "Habitats",
        (
            "A habitat is the natural home of a plant or animal.",
            "It provides food and water and shelter.",
            "A pond is a habitat for frogs and fish.",
        ),
    ),
    (
        "Tell me how birds are able to fly.",
        "How Birds Fly",
        (
            "Birds have light hollow bones.",
            "Their wings push air down to create lift.",
            "Strong chest muscles flap the wings.",
        ),
    ),
    (
        "Give tips for reading more books.",
        "Reading More",
        (
            "Keep a book with you wherever you go.",
            "Read for ten minutes before bed.",
            "Choose topics that you really enjoy.",
        ),
    ),
    (
        "Explain what inflation means.",
        "Inflation",
        (
            "Inflation is a general rise in prices over time.",
            "The same money buys fewer things.",
            "Central banks try to keep it low and steady.",
        ),
    ),
    (
        "Describe what a spider web is made of.",
        "Spider Silk",
        (
            "A spider web is made of silk.",
            "The spider makes silk in glands in its body.",
            "The silk is light but very strong.",
        ),
    ),
    (
        "Explain why we see lightning before we hear thunder.",
        "Lightning and Thunder",
        (
            "Light travels much faster than sound.",
            "The flash reaches us almost at once.",
            "The sound of thunder arrives a few seconds later.",
        ),
    ),
    (
        "Tell me what a noun is.",
        "Nouns",
        (
            "A noun is a word that names something.",
            "It can name a person or a place or a thing.",
            "Cat and city and idea are all nouns.",
        ),
    ),
    (
        "Describe how to care for a pet fish.",
        "Pet Fish Care",
        (
            "Keep the tank clean and change some water each week.",
            "Feed the fish a small amount once or twice a day.",
            "Check that the water is at the right temperature.",
        ),
    ),
    (
        "Explain how a plane stays in the air.",
        "Staying Aloft",
        (
            "A plane's wings are shaped to create lift.",
            "Engines push the plane forward fast.",
            "Air moving over the wings holds the plane up.",
        ),
    ),
    (
        "Give tips for a healthy breakfast.",
        "A Healthy Breakfast",
        (
            "Include some fruit or vegetables.",
            "Add a source of protein such as eggs or yogurt.",
            "Choose whole grains instead of sugary cereal.",
        ),
    ),
    (
        "Tell me why leaves are green.",
        "Green Leaves",
        (
            "Leaves contain a pigment called chlorophyll.",
            "Chlorophyll absorbs red and blue light.",
            "It reflects green light back to our eyes.",
        ),
    ),
    (
        "Explain what an earthquake is.",
        "Earthquakes",
        (
            "An earthquake is a sudden shaking of the ground.",
            "It happens when rocks along a fault slip.",
            "The energy travels out as waves.",
        ),
    ),
    (
        "Describe how to fold a shirt neatly.",
        "Folding a Shirt",
        (
            "Lay the shirt flat with the front facing down.",
            "Fold each side and sleeve toward the middle.",
            "Fold the bottom up to the collar.",
        ),
    ),
    (
        "Explain what DNA does.",
        "DNA",
        (
            "DNA carries the instructions for building a living thing.",
            "It is found inside almost every cell.",
            "Parents pass their DNA on to their children.",
        ),
    ),
    (
        "Tell me how a seed grows into a plant.",
        "From Seed to Plant",
        (
            "A seed needs water and warmth to sprout.",
            "A root grows down and a shoot grows up.",
            "The shoot opens leaves to catch sunlight.",
        ),
    ),
    (
        "Give tips for staying safe while cycling.",
        "Safe Cycling",
        ("Always wear a helmet.", "Use lights when it is dark.", "Signal before you turn."),
    ),
    (
        "Explain why salt melts ice on roads.",
        "Salt on Ice",
        (
            "Salt lowers the freezing point of water.",
            "Ice touching salt turns into salty water.",
            "That water stays liquid at colder temperatures.",
        ),
    ),
    (
        "Describe what a pyramid in Egypt is.",
        "Egyptian Pyramids",
        (
            "The pyramids are huge stone tombs built long ago.",
            "They were made for the kings of ancient Egypt.",
            "The largest is the Great Pyramid of Giza.",
        ),
    ),
    (
        "Explain what a fraction is.",
        "Fractions",
        (
            "A fraction shows part of a whole.",
            "The bottom number says how many equal parts there are.",
            "The top number says how many parts you have.",
        ),
    ),
    (
        "Tell me why we should recycle paper.",
        "Recycling Paper",
        (
            "Recycling paper saves trees.",
            "It uses less water and energy than making new paper.",
            "It also keeps waste out of landfills.",
        ),
    ),
    (
        "Describe how a candle burns.",
        "Candle Flames",
        (
            "The flame melts wax near the wick.",
            "The liquid wax climbs the wick and turns to vapour.",
            "The vapour burns and gives off light and heat.",
        ),
    ),
    (
        "Give tips for making new friends.",
        "Making Friends",
        (
            "Join a club or group that shares your interests.",
            "Ask people questions and listen to their answers.",
            "Be friendly and follow up after you meet.",
        ),
    ),
    (
        "Explain what a planet is.",
        "Planets",
        (
            "A planet is a large body that orbits a star.",
            "It is round because of its own gravity.",
            "Earth is one of eight planets around the sun.",
        ),
    ),
    (
        "Tell me how honey is made.",
        "Making Honey",
        (
            "Bees collect nectar from flowers.",
            "They store it in wax cells in the hive.",
            "Fanning their wings dries the nectar into honey.",
        ),
    ),
    (
        "Describe what a journalist does.",
        "A Journalist's Job",
        (
            "A journalist gathers facts about events.",
            "They interview people and check sources.",
            "Then they write or record news stories.",
        ),
    ),
    (
        "Explain why hot air rises.",
        "Rising Hot Air",
        (
            "Heating air makes its molecules spread out.",
            "Spread out air is lighter than the air around it.",
            "The lighter air floats upward.",
        ),
    ),
    (
        "Give tips for remembering names.",
        "Remembering Names",
        (
            "Repeat the name when you are introduced.",
            "Link the name to something you notice about the person.",
            "Use the name again before you say goodbye.",
        ),
    ),
    (
        "Tell me what a verb is.",
        "Verbs",
        (
            "A verb is a word for an action or a state.",
            "Run and think and be are verbs.",
            "Every full sentence has at least one verb.",
        ),
    ),
    (
        "Explain how sound travels.",
        "How Sound Travels",
        (
            "Sound is a vibration that moves through air.",
            "It passes from molecule to molecule as a wave.",
            "Our ears pick up the wave and we hear it.",
        ),
    ),
    (
        "Describe how to make rice on a stove.",
        "Stovetop Rice",
        (
            "Rinse one cup of rice in cold water.",
            "Cook it with two cups of water on low heat for fifteen minutes.",
            "Let it rest with the lid on for five more minutes.",
        ),
    ),
    (
        "Explain what a continent is.",
        "Continents",
        (
            "A continent is one of the large land masses on Earth.",
            "There are seven continents.",
            "Africa and Asia are the two largest.",
        ),
    ),
    (
        "Give tips for studying for a test.",
        "Test Preparation",
        (
            "Start reviewing several days before the test.",
            "Test yourself instead of only rereading notes.",
            "Sleep well the night before.",
        ),
    ),
    (
        "Tell me why the sun is important.",
        "Our Sun",
        (
            "The sun gives Earth light and heat.",
            "Plants need its light to grow.",
            "Without the sun life on Earth could not survive.",
        ),
    ),
    (
        "Explain what a synonym is.",
        "Synonyms",
        (
            "A synonym is a word with the same or a similar meaning.",
            "Big and large are synonyms.",
            "Synonyms help writers avoid repeating words.",
        ),
    ),
    (
        "Describe how an octopus protects itself.",
        "Octopus Defences",
        (
            "An octopus can change colour to blend in.",
            "It squirts ink to confuse predators.",
            "It can squeeze into tiny cracks to hide.",
        ),
    ),
    (
        "Explain what a tide is.",
        "Tides",
        (
            "A tide is the regular rise and fall of the sea.",
            "The moon's gravity pulls on the oceans.",
            "Most coasts get two high tides each day.",
        ),
    ),
)

PPO_FORMS = (
    "Write a short note about {}.",
    "What should a beginner know about {}?",
    "Give two interesting facts about {}.",
    "Summarise the main idea of {} for a child.",
)

PPO_TOPICS = (
    "penguins",
    "the printing press",
    "chess openings",
    "baking soda",
    "wind turbines",
    "the Great Wall of China",
    "olive trees",
    "jellyfish",
    "electric cars",
    "the human skeleton",
    "mountain climbing",
    "paper money",
    "the Amazon rainforest",
    "sourdough bread",
    "hummingbirds",
    "the Olympic Games",
    "rain gauges",
    "sea turtles",
    "the alphabet",
    "hot air balloons",
    "maple syrup",
    "bamboo",
    "the periodic table",
    "whales",
    "origami",
    "traffic lights",
    "the Sahara",
    "mushrooms",
    "bridges",
    "the piano",
    "ants",
    "windmills",
    "coffee beans",
    "the Internet",
    "snowflakes",
    "camels",
    "board games",
    "the Nile",
    "clocks",
    "soap",
    "owls",
    "castles",
    "sign language",
    "lemons",
    "rivers in winter",
    "satellites",
    "dolphins",
    "farmers' markets",
    "wool",
    "pottery",
)
